"""``type: "Python"``: a user's class named by ``python_param { module layer param_str }``, run as pycaffe's
PythonLayer runs it — ``setup``, ``reshape``, ``forward`` and ``backward`` on lists of numpy blobs.

It imports and runs arbitrary code, so it is built only where the user allowed it: a Python program that
builds the net through ``import caffe`` (as pycaffe), or the command line with ``--allow-python-layers``.
The user's ``backward`` is wired into autograd, so a Python layer trains like any other.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import numpy as np
import torch

from converter import caffe_pb2
from converter.blob import Blob
from converter.errors import layer_error
from converter.layers.base import BlobSpec, Layer, Shape, register


class BlobVec(list):
    """A Python layer's own learnable blobs (``self.blobs``): ``add_blob(*shape)`` appends a zero blob."""

    def add_blob(self, *shape: int) -> None:
        self.append(Blob(np.zeros(shape, np.float32)))


class PythonLayerBase:
    """``caffe.Layer``: what a Python layer overrides. ``param_str``, ``phase`` and ``blobs`` (its learnable
    blobs, saved in the .caffemodel and shared like any layer's) are set before ``setup``."""

    param_str: str = ""
    phase: int = caffe_pb2.TRAIN

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        pass


@register("Python")
class PythonLayer(Layer):
    num_bottoms: ClassVar[tuple[int, int | None]] = (0, None)
    num_tops: ClassVar[tuple[int, int | None]] = (0, None)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.python_param
        try:
            cls = getattr(importlib.import_module(p.module), p.layer)
        except (ImportError, AttributeError) as e:
            raise layer_error(lp.name, lp.type, f"cannot load Python layer '{p.layer}' from module '{p.module}' "
                              f"({e})") from None
        if not isinstance(cls, type):
            raise layer_error(lp.name, lp.type, f"'{p.layer}' in module '{p.module}' is not a class (a Python "
                              "layer is a class with setup, reshape, forward and backward)")
        self.impl = cls()
        self.impl.param_str, self.impl.phase, self.impl.blobs = p.param_str, phase, BlobVec()
        self.bottom_blobs = [Blob(np.zeros(s, np.float32)) for s in self.bottom_shapes]
        self.top_blobs = [Blob(np.zeros((1,), np.float32)) for _ in lp.top]
        self.impl.setup(self.bottom_blobs, self.top_blobs)
        self.impl.reshape(self.bottom_blobs, self.top_blobs)
        self.top_shapes = [b.shape for b in self.top_blobs]
        self.initial = [b.data.copy() for b in self.impl.blobs]

    def blob_specs(self) -> list[BlobSpec]:
        return [BlobSpec(v.shape, None, v) for v in self.initial]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(_Run.apply(self, len(bottoms), *bottoms, *blobs))


class _Run(torch.autograd.Function):
    """The user's forward and backward as one autograd node (numpy in, numpy out)."""

    @staticmethod
    def forward(ctx, layer: PythonLayer, n: int, *tensors: torch.Tensor):
        bottoms, params = tensors[:n], tensors[n:]
        for blob, x in zip(layer.bottom_blobs, bottoms, strict=True):
            blob.data = x.detach().cpu().numpy().astype(np.float32, copy=True)
        for blob, p in zip(layer.impl.blobs, params, strict=True):  # the net's parameters, written in place
            blob.data, blob.diff = p.detach().numpy(), np.zeros(tuple(p.shape), np.float32)
        layer.impl.reshape(layer.bottom_blobs, layer.top_blobs)
        layer.impl.forward(layer.bottom_blobs, layer.top_blobs)
        ctx.layer, ctx.needs, ctx.param_needs = layer, [b.requires_grad for b in bottoms], \
            [p.requires_grad for p in params]
        device = bottoms[0].device if bottoms else torch.device("cpu")
        return tuple(torch.from_numpy(np.array(t.data, np.float32)).to(device) for t in layer.top_blobs)

    @staticmethod
    def backward(ctx, *top_grads: torch.Tensor):
        layer = ctx.layer
        for blob, g in zip(layer.top_blobs, top_grads, strict=True):
            blob.diff = (g.detach().cpu().numpy() if g is not None else np.zeros_like(blob.data)).astype(np.float32)
        for blob in layer.bottom_blobs:
            blob.diff = np.zeros_like(blob.data)
        layer.impl.backward(layer.top_blobs, list(ctx.needs), layer.bottom_blobs)
        return (None, None, *_diffs(layer.bottom_blobs, ctx.needs), *_diffs(layer.impl.blobs, ctx.param_needs))


def _diffs(blobs: list[Blob], needs: list[bool]) -> list[torch.Tensor | None]:
    """The blobs' ``diff`` arrays as gradients, None where autograd asked for none."""
    return [torch.from_numpy(np.array(b.diff, np.float32)) if need else None
            for b, need in zip(blobs, needs, strict=True)]
