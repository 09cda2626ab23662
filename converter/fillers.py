"""Caffe's weight fillers (``include/caffe/filler.hpp``), drawn from torch's seeded generator.

The distributions and fan rules are Caffe's; the random stream is torch's (Caffe draws from boost's
mt19937, which cannot be reproduced bit for bit), so a seeded run is reproducible here but does not
give Caffe's exact initial numbers — load an ``init.caffemodel`` for that.
"""

from __future__ import annotations

import math

import torch

from converter import caffe_pb2
from converter.errors import CaffeError

VarianceNorm = caffe_pb2.FillerParameter.VarianceNorm


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe: fan_in = count / shape(0), fan_out = count / shape(1)."""
    count = math.prod(shape)
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_n(filler: caffe_pb2.FillerParameter, shape: tuple[int, ...]) -> float:
    fan_in, fan_out = _fans(shape)
    if filler.variance_norm == VarianceNorm.Value("AVERAGE"):
        return (fan_in + fan_out) / 2.0
    if filler.variance_norm == VarianceNorm.Value("FAN_OUT"):
        return float(fan_out)
    return float(fan_in)


def fill(filler: caffe_pb2.FillerParameter, shape: tuple[int, ...], what: str = "blob",
         generator: torch.Generator | None = None) -> torch.Tensor:
    """A new float32 tensor of ``shape`` filled as Caffe's filler ``filler.type`` would."""
    out = torch.empty(shape, dtype=torch.float32)
    kind = filler.type
    if kind == "constant":
        return out.fill_(filler.value)
    if kind == "uniform":
        return out.uniform_(filler.min, filler.max, generator=generator)
    if kind == "gaussian":
        out.normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            if len(shape) < 2:
                raise CaffeError(f"{what}: a sparse gaussian filler needs a blob with at least 2 axes")
            keep = filler.sparse / shape[0]
            mask = torch.empty(shape).bernoulli_(keep, generator=generator)
            out.mul_(mask)
        return out
    if kind == "positive_unitball":
        out.uniform_(0.0, 1.0, generator=generator)
        rows = out.reshape(shape[0], -1) if shape else out.reshape(1, -1)
        rows.div_(rows.sum(dim=1, keepdim=True))
        return out
    if kind == "xavier":
        bound = math.sqrt(3.0 / _variance_n(filler, shape))
        return out.uniform_(-bound, bound, generator=generator)
    if kind == "msra":
        return out.normal_(0.0, math.sqrt(2.0 / _variance_n(filler, shape)), generator=generator)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise CaffeError(f"{what}: the bilinear filler needs a 4-D blob with square kernels, got {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        idx = torch.arange(k, dtype=torch.float64)
        line = 1 - torch.abs(idx / f - c)
        kernel = (line[:, None] * line[None, :]).to(torch.float32)
        return out.copy_(kernel.expand(shape))
    raise CaffeError(f"{what}: unknown filler type '{kind}' "
                     "(constant, uniform, gaussian, positive_unitball, xavier, msra, bilinear)")
