"""Caffe's neuron layers: element-wise maps whose top has the bottom's shape (``neuron_layer.cpp``).

Each layer follows its ``src/caffe/layers/<name>_layer.cpp`` in float32, including where Caffe computes
in double (Sigmoid's ``0.5 * tanh(0.5 * x) + 0.5``, BNLL's ``log(1. + exp(x))``), which ``x > 0`` test
it uses (it fixes the derivative at exactly 0: ReLU/PReLU/ELU take the negative side, AbsVal takes
``sign(0) = 0``), and which scalar multiplies it skips. Autograd supplies the backward wherever Caffe's
backward is the exact gradient of its forward; Power and BNLL, whose backward formulas differ from
that gradient (Power's ``y / x`` shortcuts give NaN at 0, BNLL clamps at ``kBNLL_THRESHOLD``), get a
small ``torch.autograd.Function`` with Caffe's own backward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from converter import caffe_pb2
from converter.layers.base import BlobSpec, Layer, Shape, constant_filler, register


def f32(value: float) -> float:
    """``value`` rounded to float32 (Caffe's ``Dtype``), as a Python float that keeps it exactly."""
    return float(np.float32(value))


def caffe_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Caffe's ``sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5``; the literals are doubles, so it runs in double.

    Shared by Sigmoid and Swish (``sigmoid_layer.cpp``); other families may use it too.
    """
    return (0.5 * torch.tanh(0.5 * x.double()) + 0.5).to(x.dtype)


def _with_caffe_backward(fn: type[torch.autograd.Function], x: torch.Tensor, *args: float) -> torch.Tensor:
    """``fn.apply`` when a gradient is wanted, else the plain forward ``fn.compute``.

    Inference and tracing (ONNX export) then see only ordinary torch ops.
    """
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return fn.apply(x, *args)
    return fn.compute(x, *args)


class NeuronLayer(Layer):
    """Caffe's NeuronLayer: one bottom, one top of the same shape."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [self.bottom_shapes[0]]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.compute(bottoms[0], blobs)]

    def compute(self, x: torch.Tensor, blobs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@register("ReLU")
class ReLU(NeuronLayer):
    """``y = max(x, 0) + negative_slope * min(x, 0)``; backward tests ``x > 0``, so dy/dx(0) = slope."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.negative_slope = lp.relu_param.negative_slope

    def compute(self, x, blobs):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)


@register("PReLU")
class PReLU(NeuronLayer):
    """ReLU with learnt slopes, one per channel (axis 1) or one shared (``prelu_layer.cpp``).

    The slope blob is ``(C,)``, or a 0-axis blob (shape ``()``) when ``channel_shared`` — Caffe makes it
    with ``vector<int>(0)``. Without a filler Caffe fills it with the constant 0.25. Slope gradient:
    ``sum(dy * x)`` over ``x <= 0``; bottom gradient: ``dy * (x > 0 ? 1 : slope)``.
    """

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.prelu_param
        self.check(len(self.bottom_shapes[0]) >= 2, "number of axes of bottom blob must be >= 2")
        self.channel_shared = p.channel_shared
        self.filler = p.filler if p.HasField("filler") else constant_filler(0.25)

    def blob_specs(self):
        shape = () if self.channel_shared else (self.bottom_shapes[0][1],)
        return [BlobSpec(shape, self.filler)]

    def compute(self, x, blobs):
        return F.prelu(x, blobs[0].reshape(-1))


@register("ELU")
class ELU(NeuronLayer):
    """``y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)``; backward tests ``x > 0``: dy/dx(0) = alpha."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.alpha = lp.elu_param.alpha

    def compute(self, x, blobs):
        # where, not max/min: clamp's gradient at the boundary would count x == 0 on both sides.
        return torch.where(x > 0, x, self.alpha * (torch.exp(torch.clamp(x, max=0)) - 1))


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """Caffe's sigmoid, computed in double as ``sigmoid_layer.cpp`` does; backward ``dy * y * (1 - y)``."""

    def compute(self, x, blobs):
        return caffe_sigmoid(x)


@register("TanH")
class TanH(NeuronLayer):
    """``y = tanh(x)`` (float); backward ``dy * (1 - y^2)``."""

    def compute(self, x, blobs):
        return torch.tanh(x)


@register("AbsVal")
class AbsVal(NeuronLayer):
    """``y = |x|``; backward ``dy * sign(x)`` with ``sign(0) = 0``. Caffe refuses in-place use."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.check(lp.top[0] != lp.bottom[0], "AbsVal layer does not allow in-place computation")

    def compute(self, x, blobs):
        return torch.abs(x)


class _PowerFn(torch.autograd.Function):
    """``power_layer.cpp``: forward and Caffe's backward, which is not always the exact gradient.

    Backward: ``diff_scale = power * scale``; 0 if ``diff_scale == 0``; ``dy * diff_scale`` if
    ``power == 1``; ``dy * (diff_scale*scale * x + diff_scale*shift)`` if ``power == 2``;
    ``dy * power * y / x`` if ``shift == 0``; else ``dy * diff_scale * y / (shift + scale * x)``
    (NaN where the base is 0, as in Caffe).
    """

    @staticmethod
    def compute(x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
        if f32(power * scale) == 0:  # the input is ignored: a constant top
            return torch.full_like(x, 1.0 if power == 0 else f32(np.float32(shift) ** np.float32(power)))
        y = x
        if scale != 1:
            y = y * scale
        if shift != 0:
            y = y + shift
        if power != 1:
            y = y.pow(power)
        return x.clone() if y is x else y

    @staticmethod
    def forward(ctx, x, power, scale, shift):
        y = _PowerFn.compute(x, power, scale, shift)
        ctx.save_for_backward(x, y)
        ctx.params = (power, scale, shift)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.params
        diff_scale = f32(power * scale)
        if diff_scale == 0:
            dx = torch.zeros_like(x)
        elif power == 1:
            dx = dy * diff_scale
        elif power == 2:
            d = x * f32(diff_scale * scale)
            if shift != 0:
                d = d + f32(diff_scale * shift)
            dx = dy * d
        elif shift == 0:
            dx = dy * ((y / x) * power)
        else:
            base = x * scale if scale != 1 else x
            d = y / (base + shift)
            if diff_scale != 1:
                d = d * diff_scale
            dx = dy * d
        return dx, None, None, None


@register("Power")
class Power(NeuronLayer):
    """``y = (shift + scale * x)^power`` with Caffe's shortcuts in forward and backward (see _PowerFn)."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift

    def compute(self, x, blobs):
        return _with_caffe_backward(_PowerFn, x, self.power, self.scale, self.shift)


def _log_base(layer: Layer, base: float) -> float:
    """Caffe's ``log_base`` of Exp and Log: 1 exactly for ``base == -1`` (meaning e), else ``log(base)``."""
    if base == -1:
        return 1.0
    layer.check(base > 0, f"base must be strictly positive, got {base}")
    log_base = f32(np.log(np.float32(base)))
    layer.check(np.isfinite(log_base), f"log(base) = log({base}) is not finite")
    return log_base


@register("Exp")
class Exp(NeuronLayer):
    """``y = base^(shift + scale * x)`` as ``outer * exp(inner * x)`` (``exp_layer.cpp``).

    ``inner = log(base) * scale``, ``outer = base^shift`` (``exp(shift)`` for base e), each multiply
    skipped when its factor is 1. Backward ``dy * y * inner`` is the exact gradient.
    """

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.exp_param
        log_base = _log_base(self, p.base)
        self.inner = f32(log_base * p.scale)
        if p.shift == 0:
            self.outer = 1.0
        elif p.base == -1:
            self.outer = f32(np.exp(np.float32(p.shift)))
        else:
            self.outer = f32(np.float32(p.base) ** np.float32(p.shift))

    def compute(self, x, blobs):
        y = torch.exp(x if self.inner == 1 else x * self.inner)
        return y if self.outer == 1 else y * self.outer


@register("Log")
class Log(NeuronLayer):
    """``y = log_base(shift + scale * x)`` as ``log(shift + scale * x) * (1 / log(base))`` (``log_layer.cpp``).

    Backward ``dy * scale / log(base) / (shift + scale * x)`` is the exact gradient.
    """

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.log_param
        log_base = _log_base(self, p.base)
        with np.errstate(divide="ignore", over="ignore"):
            self.base_scale = f32(np.float32(1) / np.float32(log_base))
        self.check(np.isfinite(self.base_scale), f"1 / log(base) = 1 / log({p.base}) is not finite")
        self.scale, self.shift = p.scale, p.shift

    def compute(self, x, blobs):
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        y = torch.log(x)
        return y if self.base_scale == 1 else y * self.base_scale


_BNLL_THRESHOLD = 50.0  # kBNLL_THRESHOLD in bnll_layer.cpp


class _BNLLFn(torch.autograd.Function):
    """``bnll_layer.cpp``: forward ``x + log(1. + exp(-x))`` (x > 0) else ``log(1. + exp(x))``, exp in float
    and the rest in double; backward ``dy * e / (e + 1.)`` with ``e = exp(min(x, 50))``."""

    @staticmethod
    def compute(x: torch.Tensor) -> torch.Tensor:
        positive = x > 0
        e = torch.exp(torch.where(positive, -x, x)).double()
        soft = torch.log(1.0 + e)
        return torch.where(positive, x.double() + soft, soft).to(x.dtype)

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _BNLLFn.compute(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        e = torch.exp(torch.clamp(x, max=_BNLL_THRESHOLD))
        return ((dy * e).double() / (e.double() + 1.0)).to(dy.dtype)


@register("BNLL")
class BNLL(NeuronLayer):
    """Binomial normal log likelihood ``log(1 + exp(x))``, computed as Caffe does (see _BNLLFn)."""

    def compute(self, x, blobs):
        return _with_caffe_backward(_BNLLFn, x)


@register("Threshold")
class Threshold(NeuronLayer):
    """``y = x > threshold ? 1 : 0`` (strictly greater). Caffe has no backward (NOT_IMPLEMENTED): no gradient."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.threshold = lp.threshold_param.threshold

    def compute(self, x, blobs):
        return (x > self.threshold).to(x.dtype)


@register("Dropout")
class Dropout(NeuronLayer):
    """``dropout_layer.cpp``: in the net's TRAIN phase ``y = x * mask * scale`` with
    ``mask ~ Bernoulli(1 - ratio)`` drawn from torch's global generator and ``scale = 1 / (1 - ratio)``
    (backward ``dy * mask * scale``); in TEST the identity (a copy).

    Forks with ``scale_train: false`` (not in BVLC's schema; honoured if ours has it) scale at test
    time instead: TRAIN ``y = x * mask``, TEST ``y = x * (1 - ratio)``. Caffe only DCHECKs the ratio;
    a ratio outside [0, 1) is refused here (ratio 1 gives NaN in a release build).
    """

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.dropout_param
        self.ratio = p.dropout_ratio
        self.check(0 <= self.ratio < 1, f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale_train = p.scale_train if "scale_train" in p.DESCRIPTOR.fields_by_name else True
        self.scale = f32(1.0 / (1.0 - self.ratio))  # double division stored in a float (scale_)

    def compute(self, x, blobs):
        if self.phase == caffe_pb2.TRAIN:
            mask = torch.empty_like(x).bernoulli_(1.0 - self.ratio)
            return x * (mask * self.scale if self.scale_train else mask)
        if self.scale_train:
            return x.clone()
        return x * f32(np.float32(1) - np.float32(self.ratio))


@register("Clip")
class Clip(NeuronLayer):
    """``y = max(min, min(x, max))`` (``clip_layer.cpp``, BVLC master); gradient where ``min <= x <= max``."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.clip_param
        self.check(p.HasField("min") and p.HasField("max"), "clip_param needs both min and max")
        self.min, self.max = p.min, p.max

    def compute(self, x, blobs):
        # Two clamps, not clamp(min, max): with min > max Caffe yields min, torch.clamp would yield max.
        return torch.clamp(torch.clamp(x, max=self.max), min=self.min)


@register("Swish")
class Swish(NeuronLayer):
    """``y = x * sigmoid(beta * x)`` (``swish_layer.cpp``, BVLC master), Caffe's double-precision sigmoid."""

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.beta = lp.swish_param.beta

    def compute(self, x, blobs):
        return x * caffe_sigmoid(x * self.beta)
