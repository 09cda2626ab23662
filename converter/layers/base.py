"""The layer registry and the contract every Caffe layer implements.

A layer is one small ``nn.Module`` registered under its Caffe type name. It is built from its
``LayerParameter``, the shapes of its bottoms and the net's phase; it computes its top shapes at build
time (raising :class:`CaffeError` naming the layer when the bottoms do not fit), declares its learnable
blobs in Caffe's order with their fillers, and computes its tops from its bottoms.

Learnable blobs are *not* owned by the layer: the net creates one ``nn.Parameter`` per distinct blob
(weight sharing by ``param { name }`` is then just handing the same tensor to several layers) and
passes them to :meth:`Layer.forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from converter import caffe_pb2
from converter.errors import CaffeError, format_shape, layer_error

Shape = tuple[int, ...]

_REGISTRY: dict[str, type[Layer]] = {}


def register(*type_names: str):
    """Class decorator: make a layer buildable under one or more Caffe type names."""

    def wrap(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            if name in _REGISTRY:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.type_names = type_names
        return cls

    return wrap


def supported_types() -> list[str]:
    return sorted(_REGISTRY)


_PYTHON_LAYERS_ALLOWED = False


def allow_python_layers(allowed: bool) -> None:
    """Whether ``type: "Python"`` layers may be built (converter/layers/python.py runs them).

    A Python layer names any module and class (``module: "os"`` …) and runs it, so it is refused unless the
    user vouched for the net: ``--allow-python-layers`` on the command line, or a Python program that builds
    the net through ``import caffe`` (as pycaffe always runs them).
    """
    global _PYTHON_LAYERS_ALLOWED
    _PYTHON_LAYERS_ALLOWED = bool(allowed)


def python_layers_allowed() -> bool:
    return _PYTHON_LAYERS_ALLOWED


def layer_class(lp: caffe_pb2.LayerParameter) -> type[Layer]:
    """The class registered for ``lp.type``, or a CaffeError naming the layer and the supported types."""
    if lp.type == "Python" and not _PYTHON_LAYERS_ALLOWED:
        raise layer_error(lp.name, lp.type, "Python layers run arbitrary code and are refused (pass "
                          "--allow-python-layers only for files you trust)")
    cls = _REGISTRY.get(lp.type)
    if cls is None:
        raise layer_error(lp.name, lp.type or "<no type>",
                          f"unsupported layer type; supported: {', '.join(supported_types())}")
    return cls


@dataclass(frozen=True)
class BlobSpec:
    """A learnable blob a layer needs: its Caffe shape and the filler that initialises it (or, for a Python
    layer's own blobs, the values its ``setup`` gave them)."""

    shape: Shape
    filler: caffe_pb2.FillerParameter | None
    values: np.ndarray | None = None


def count(shape: tuple[int, ...] | list[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's ``Blob::count(start, end)``: the product of ``shape[start:end]`` (1 for an empty range)."""
    return math.prod(shape[start:end])


def constant_filler(value: float) -> caffe_pb2.FillerParameter:
    """A constant filler; used where Caffe's C++ (not the schema) picks a layer-specific default."""
    return caffe_pb2.FillerParameter(type="constant", value=value)


class Layer(nn.Module):
    """Base of every registered layer.

    Subclasses set ``num_bottoms``/``num_tops`` (``(min, max)``, max ``None`` = unbounded), compute
    ``self.top_shapes`` in ``__init__`` and implement :meth:`forward`. ``is_loss`` layers get
    ``loss_weight: 1`` on top 0 by default, as Caffe's LossLayer does. ``is_data`` layers produce
    their tops outside the module (the runner feeds them).
    """

    type_names: ClassVar[tuple[str, ...]] = ()
    num_bottoms: ClassVar[tuple[int, int | None]] = (1, 1)
    num_tops: ClassVar[tuple[int, int | None]] = (1, 1)
    is_loss: ClassVar[bool] = False
    is_data: ClassVar[bool] = False

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__()
        self.name = lp.name
        self.type = lp.type
        self.phase = phase
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]
        self.check_counts(lp)
        self.top_shapes: list[Shape] = []

    # -- helpers for subclasses ---------------------------------------------------------------
    def error(self, message: str) -> CaffeError:
        """A CaffeError naming this layer (and its bottom shapes, which is what usually went wrong)."""
        shapes = ", ".join(format_shape(s) for s in self.bottom_shapes)
        return layer_error(self.name, self.type, f"{message} (bottom shapes: {shapes})")

    def check(self, condition: bool, message: str) -> None:
        """Caffe's CHECK, as a user-facing error instead of an abort."""
        if not condition:
            raise self.error(message)

    def live_shape(self, shape: Shape, x: torch.Tensor) -> Shape:
        """A build-time top shape with the batch axis the bottom ``x`` actually has.

        Nets are built for the batch size of their data layers (as Caffe's Reshape does) but run with any
        batch (deploy nets, ONNX export with a dynamic batch): a top whose first axis is the bottom's
        first axis follows it.
        """
        built = self.bottom_shapes[0] if self.bottom_shapes else ()
        if shape and built and shape[0] == built[0] and x.dim() and x.shape[0] != built[0]:
            return (int(x.shape[0]),) + tuple(shape[1:])
        return shape

    def canonical_axis(self, axis: int, num_axes: int | None = None) -> int:
        """Caffe's Blob::CanonicalAxisIndex: negative axes count from the end, range-checked."""
        n = len(self.bottom_shapes[0]) if num_axes is None else num_axes
        self.check(-n <= axis < n, f"axis {axis} out of range for a {n}-axis blob")
        return axis % n if n else 0

    @classmethod
    def check_counts(cls, lp: caffe_pb2.LayerParameter) -> None:
        """Caffe's CheckBlobCounts: needs no shapes, so a net whose data is absent is still checked."""
        for what, have, (lo, hi) in (("bottom", len(lp.bottom), cls.num_bottoms),
                                     ("top", len(lp.top), cls.num_tops)):
            if have < lo or (hi is not None and have > hi):
                want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}..{hi}"
                raise layer_error(lp.name, lp.type, f"takes {want} {what} blob(s), got {have}")

    # -- the contract ---------------------------------------------------------------------------
    def blob_specs(self) -> list[BlobSpec]:
        """Learnable blobs in Caffe's order (0 = weights, 1 = bias, ...)."""
        return []

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError
