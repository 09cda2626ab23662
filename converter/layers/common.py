"""Caffe's "common" layers: dense, shape-manipulating, element-wise and normalising layers.

Each class follows one ``src/caffe/layers/<name>_layer.cpp`` of BVLC Caffe 1.0: the build-time CHECKs
become :meth:`Layer.check` errors, the forward is written with torch ops so autograd gives Caffe's
backward (which for these layers is the exact gradient of the forward, with the tie rules made
explicit where a max is involved). Defaults are read from the parsed message only.

Shared helpers other families may want: :func:`count` (Caffe's ``Blob::count(start, end)``) and
:func:`caffe_topk` (top-k with Caffe's ``std::greater<pair>`` tie rule: equal values, larger index first).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from converter import caffe_pb2
from converter.errors import format_shape
from converter.layers.base import BlobSpec, Layer, Shape, constant_filler, count, register

EltwiseOp = caffe_pb2.EltwiseParameter
ReductionOp = caffe_pb2.ReductionParameter


def caffe_topk(x: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along ``dim`` and their indices (as float32, like Caffe's tops).

    ArgMax (``argmax_layer.cpp``) sorts ``(value, index)`` pairs with ``std::greater``, so among equal
    values the *larger* index comes first. A stable descending sort of the reversed axis gives exactly
    that order. In an ONNX export the same order comes from ``TopK`` of the reversed axis (torch.onnx cannot
    export a stable sort): ONNX's TopK breaks ties by the lower index, i.e. the larger original one.
    """
    n = x.shape[dim]
    if torch.onnx.is_in_onnx_export():
        values, rev_idx = torch.topk(x.flip(dim), k, dim=dim, largest=True, sorted=True)
    else:
        values, rev_idx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        values, rev_idx = values.narrow(dim, 0, k), rev_idx.narrow(dim, 0, k)
    indices = (n - 1) - rev_idx
    return values, indices.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------------------------------
@register("InnerProduct")
class InnerProduct(Layer):
    """``inner_product_layer.cpp``: flatten axes ``[axis, end)`` into K, ``y = x·Wᵀ + b``.

    The weight is stored ``(num_output, K)``, or ``(K, num_output)`` with ``transpose: true``; the
    leading axes ``[0, axis)`` are kept and the top is ``shape[:axis] + (num_output,)``.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.inner_product_param
        shape = self.bottom_shapes[0]
        self.axis = self.canonical_axis(p.axis)
        self.num_output = p.num_output
        self.check(self.num_output > 0, "inner_product_param.num_output must be set and positive")
        self.k = count(shape, self.axis)
        self.transpose = p.transpose
        self.bias_term = p.bias_term
        self.weight_filler = p.weight_filler
        self.bias_filler = p.bias_filler
        self.top_shapes = [shape[: self.axis] + (self.num_output,)]

    def blob_specs(self) -> list[BlobSpec]:
        w = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        specs = [BlobSpec(w, self.weight_filler)]
        if self.bias_term:
            specs.append(BlobSpec((self.num_output,), self.bias_filler))
        return specs

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0].reshape(-1, self.k)
        w = blobs[0]
        # Caffe: one gemm for x·W(ᵀ), then a second one adding the bias row (two roundings, as here).
        y = x.matmul(w if self.transpose else w.t())
        if self.bias_term:
            y = y + blobs[1]
        return [y.reshape(self.live_shape(self.top_shapes[0], bottoms[0]))]


@register("Embed")
class Embed(Layer):
    """``embed_layer.cpp``: look up row ``int(x)`` of a ``(input_dim, num_output)`` weight.

    The bottom holds indices stored as floats (truncated toward zero by ``static_cast<int>``); Caffe
    refuses to back-propagate into it, so it is detached. Top shape: ``bottom.shape + (num_output,)``.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.embed_param
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        self.check(self.num_output > 0, "EmbedLayer num_output must be positive")
        self.check(self.input_dim > 0, "EmbedLayer input_dim must be positive")
        self.bias_term = p.bias_term
        self.weight_filler = p.weight_filler
        self.bias_filler = p.bias_filler
        self.top_shapes = [self.bottom_shapes[0] + (self.num_output,)]

    def blob_specs(self) -> list[BlobSpec]:
        specs = [BlobSpec((self.input_dim, self.num_output), self.weight_filler)]
        if self.bias_term:
            specs.append(BlobSpec((self.num_output,), self.bias_filler))
        return specs

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        index = bottoms[0].detach().long()
        y = torch.nn.functional.embedding(index, blobs[0])
        if self.bias_term:
            y = y + blobs[1]
        return [y]


# ---------------------------------------------------------------------------------------------------
# Softmax and ArgMax
# ---------------------------------------------------------------------------------------------------
@register("Softmax")
class Softmax(Layer):
    """``softmax_layer.cpp``: ``exp(x - max) / sum`` over ``axis``, each (outer, inner) position alone.

    ``torch.softmax`` is max-subtracted and its backward is Caffe's ``(dy - Σ dy·y)·y``.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        self.axis = self.canonical_axis(lp.softmax_param.axis)
        self.top_shapes = [self.bottom_shapes[0]]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.softmax(bottoms[0], dim=self.axis)]


@register("ArgMax")
class ArgMax(Layer):
    """``argmax_layer.cpp`` (forward only): indices (or values) of the ``top_k`` largest entries.

    Without ``axis`` each item is flattened and the top is ``(N, 1, top_k)`` — or ``(N, 2, top_k)``
    with ``out_max_val`` (indices then values) — padded with 1s to the bottom's number of axes. With
    ``axis`` the top is the bottom's shape with ``shape[axis] = top_k`` holding indices, or the values
    themselves when ``out_max_val``. Ties: larger index first (see :func:`caffe_topk`).
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.argmax_param
        shape = self.bottom_shapes[0]
        self.out_max_val = p.out_max_val
        self.top_k = p.top_k
        self.check(self.top_k >= 1, "top k must not be less than 1")
        self.axis: int | None = None
        if p.HasField("axis"):
            self.axis = self.canonical_axis(p.axis)
            self.check(self.top_k <= shape[self.axis],
                       f"top_k ({self.top_k}) must be less than or equal to the dimension of the axis "
                       f"({shape[self.axis]})")
            top = list(shape)
            top[self.axis] = self.top_k
        else:
            self.check(len(shape) >= 1 and self.top_k <= count(shape, 1),
                       f"top_k ({self.top_k}) must be less than or equal to the dimension of the "
                       "flattened bottom blob per instance")
            top = [1] * max(len(shape), 3)
            top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        self.top_shapes = [tuple(top)]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0].detach()
        if self.axis is not None:
            values, indices = caffe_topk(x, self.axis, self.top_k)
            return [values if self.out_max_val else indices]
        values, indices = caffe_topk(x.reshape(x.shape[0], -1), 1, self.top_k)
        parts = [indices, values] if self.out_max_val else [indices]
        return [torch.stack(parts, dim=1).reshape(self.live_shape(self.top_shapes[0], x))]


# ---------------------------------------------------------------------------------------------------
# Concat / Slice / Split / Silence
# ---------------------------------------------------------------------------------------------------
def _legacy_axis(layer: Layer, param, legacy: str) -> int:
    """``axis`` or its deprecated non-negative alias (``concat_dim``/``slice_dim``), never both."""
    has_legacy = param.HasField(legacy)
    layer.check(not (param.HasField("axis") and has_legacy),
                f"Either axis or {legacy} should be specified; not both")
    if not has_legacy:
        return layer.canonical_axis(param.axis)
    ndim = len(layer.bottom_shapes[0])
    value = getattr(param, legacy)
    layer.check(value < ndim, f"{legacy} {value} out of range for a {ndim}-axis blob")
    return value


@register("Concat")
class Concat(Layer):
    """``concat_layer.cpp``: join the bottoms along ``axis``; every other dimension must match."""

    num_bottoms: ClassVar[tuple[int, int | None]] = (1, None)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        self.axis = _legacy_axis(self, lp.concat_param, "concat_dim")
        first = self.bottom_shapes[0]
        top = list(first)
        for i, shape in enumerate(self.bottom_shapes[1:], start=1):
            self.check(len(shape) == len(first),
                       f"all inputs must have the same number of axes: bottom {i} has shape {format_shape(shape)}, "
                       f"bottom 0 has {format_shape(first)}")
            for j, (a, b) in enumerate(zip(first, shape, strict=True)):
                self.check(j == self.axis or a == b,
                           f"all inputs must have the same shape except at concat axis {self.axis}: "
                           f"bottom {i} has shape {format_shape(shape)}, bottom 0 has {format_shape(first)} "
                           f"(axis {j} differs)")
            top[self.axis] += shape[self.axis]
        self.top_shapes = [tuple(top)]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(bottoms) == 1:
            return [bottoms[0].view_as(bottoms[0])]
        return [torch.cat(bottoms, dim=self.axis)]


@register("Slice")
class Slice(Layer):
    """``slice_layer.cpp``: cut the bottom along ``axis`` at ``slice_point`` (or evenly).

    ``slice_point`` needs ``#tops - 1`` strictly increasing entries; without it the axis is divided
    into ``#tops`` equal parts, which must divide it.
    """

    num_tops: ClassVar[tuple[int, int | None]] = (1, None)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.slice_param
        self.axis = _legacy_axis(self, p, "slice_dim")
        shape = self.bottom_shapes[0]
        size, n_tops = shape[self.axis], len(lp.top)
        points = list(p.slice_point)
        if points:
            self.check(len(points) == n_tops - 1,
                       f"slice_point needs #tops - 1 = {n_tops - 1} entries, got {len(points)} ({points})")
            self.check(n_tops <= size, f"{n_tops} tops cannot slice axis {self.axis} of size {size}")
            prev, self.sizes = 0, []
            for point in points:
                self.check(point > prev, f"slice_point must be strictly increasing and positive, got {points}")
                self.sizes.append(point - prev)
                prev = point
            self.check(prev <= size,
                       f"slice_point {prev} is beyond axis {self.axis} of size {size} (slice_point {points})")
            self.sizes.append(size - prev)
        else:
            self.check(size % n_tops == 0,
                       f"number of top blobs ({n_tops}) should evenly divide input slice axis ({size})")
            self.sizes = [size // n_tops] * n_tops
        self.top_shapes = [shape[: self.axis] + (s,) + shape[self.axis + 1:] for s in self.sizes]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.split(bottoms[0], self.sizes, dim=self.axis))


@register("Split")
class Split(Layer):
    """``split_layer.cpp``: every top is the bottom; backward sums the tops' gradients (autograd does)."""

    num_tops: ClassVar[tuple[int, int | None]] = (1, None)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [self.bottom_shapes[0]] * len(lp.top)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Distinct views, so each top is its own tensor (own .grad when retained), sharing storage.
        return [bottoms[0].view_as(bottoms[0]) for _ in self.top_shapes]


@register("Silence")
class Silence(Layer):
    """``silence_layer.cpp``: consumes bottoms, produces nothing; their gradient from here is zero."""

    num_bottoms: ClassVar[tuple[int, int | None]] = (1, None)
    num_tops: ClassVar[tuple[int, int | None]] = (0, 0)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return []


# ---------------------------------------------------------------------------------------------------
# Eltwise
# ---------------------------------------------------------------------------------------------------
class _UnstableProd(torch.autograd.Function):
    """Eltwise PROD with ``stable_prod_grad: false``: Caffe's ``dx_i = dy · y / x_i`` (inf/nan at 0)."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:
        y = xs[0]
        for x in xs[1:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, *xs = ctx.saved_tensors
        return tuple(y / x * dy for x in xs)


@register("Eltwise")
class Eltwise(Layer):
    """``eltwise_layer.cpp``: SUM (with one ``coeff`` per bottom), PROD or MAX of equal-shape bottoms.

    MAX follows Caffe's mask exactly: between bottom 0 and bottom 1 a tie goes to bottom 1
    (``a > b ? a : b``); a later bottom replaces the running max only when strictly greater. The
    whole gradient goes to the winning bottom — ``torch.where`` routes it that way without splitting
    ties as ``torch.maximum`` would.
    """

    num_bottoms: ClassVar[tuple[int, int | None]] = (2, None)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.eltwise_param
        self.op = p.operation
        coeffs = list(p.coeff)
        self.check(not coeffs or len(coeffs) == len(lp.bottom),
                   f"Eltwise layer takes one coefficient per bottom blob ({len(coeffs)} coeff for "
                   f"{len(lp.bottom)} bottoms)")
        self.check(not (self.op == EltwiseOp.PROD and coeffs),
                   "Eltwise layer only takes coefficients for summation")
        self.coeffs = coeffs or [1.0] * len(lp.bottom)
        self.stable_prod_grad = p.stable_prod_grad
        first = self.bottom_shapes[0]
        for i, shape in enumerate(self.bottom_shapes[1:], start=1):
            self.check(shape == first, f"all bottoms must have the same shape: bottom {i} is {format_shape(shape)}, "
                                       f"bottom 0 is {format_shape(first)}")
        self.top_shapes = [first]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.op == EltwiseOp.SUM:
            y = None
            for c, x in zip(self.coeffs, bottoms, strict=True):
                term = x if c == 1 else x * c
                y = term if y is None else y + term
        elif self.op == EltwiseOp.PROD:
            if not self.stable_prod_grad:
                return [_UnstableProd.apply(*bottoms)]
            y = bottoms[0]
            for x in bottoms[1:]:
                y = y * x
        else:
            a, b = bottoms[0], bottoms[1]
            y = torch.where(a > b, a, b)
            for x in bottoms[2:]:
                y = torch.where(x > y, x, y)
        return [y]


# ---------------------------------------------------------------------------------------------------
# Reshaping layers: Flatten, Reshape, Crop, Tile
# ---------------------------------------------------------------------------------------------------
def _no_in_place(layer: Layer, lp: caffe_pb2.LayerParameter) -> None:
    layer.check(not (lp.top and lp.bottom and lp.top[0] == lp.bottom[0]),
                f"{lp.type} layer does not allow in-place computation")


@register("Flatten")
class Flatten(Layer):
    """``flatten_layer.cpp``: collapse axes ``axis..end_axis`` (inclusive) into one."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        _no_in_place(self, lp)
        p = lp.flatten_param
        shape = self.bottom_shapes[0]
        start, end = self.canonical_axis(p.axis), self.canonical_axis(p.end_axis)
        self.check(start <= end + 1, f"end_axis {p.end_axis} comes before axis {p.axis}")
        self.top_shapes = [shape[:start] + (count(shape, start, end + 1),) + shape[end + 1:]]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [bottoms[0].reshape(self.live_shape(self.top_shapes[0], bottoms[0]))]


@register("Reshape")
class Reshape(Layer):
    """``reshape_layer.cpp``: replace axes ``[axis, axis+num_axes)`` by ``shape.dim``.

    A ``0`` copies the bottom's dimension at the same position, one ``-1`` is inferred from the
    count; ``axis`` may be negative (``-1`` = after the last axis) and ``num_axes: -1`` means to the end.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        _no_in_place(self, lp)
        p = lp.reshape_param
        shape = self.bottom_shapes[0]
        ndim = len(shape)
        dims = list(p.shape.dim)
        self.check(dims.count(-1) <= 1, "new shape contains multiple -1 dims; at most a single (1) value "
                                        f"of -1 may be specified (shape {dims})")
        self.check(all(d >= -1 for d in dims), f"new shape has a dimension below -1 ({dims})")
        start = p.axis if p.axis >= 0 else ndim + p.axis + 1
        self.check(0 <= start <= ndim, f"axis {p.axis} out of range for a {ndim}-axis bottom")
        self.check(p.num_axes >= -1, "num_axes must be >= 0, or -1 for all")
        end = ndim if p.num_axes == -1 else start + p.num_axes
        self.check(end <= ndim, f"end_axis = axis + num_axes = {end} is out of range for a {ndim}-axis bottom")
        new = list(dims)
        for i, d in enumerate(dims):
            if d == 0:
                self.check(start + i < ndim,
                           "new shape contains a 0, but there was no corresponding bottom axis to copy")
                new[i] = shape[start + i]
        top = list(shape[:start]) + new + list(shape[end:])
        total = count(shape)
        if -1 in dims:
            explicit = count(shape[:start]) * count(shape[end:]) * math.prod(d for d in new if d != -1)
            self.check(explicit != 0 and total % explicit == 0,
                       f"bottom count ({total}) must be divisible by the product of the specified "
                       f"dimensions ({explicit})")
            top[start + dims.index(-1)] = total // explicit
        self.check(count(top) == total,
                   f"output count must match input count: shape {format_shape(top)} has {count(top)}, "
                   f"the bottom {total}")
        self.top_shapes = [tuple(top)]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [bottoms[0].reshape(self.live_shape(self.top_shapes[0], bottoms[0]))]


@register("Crop")
class Crop(Layer):
    """``crop_layer.cpp``: crop bottom 0 to bottom 1's size on every axis from ``axis`` on.

    Offsets: none = 0 everywhere; one = the same offset on every cropped axis; several = one per
    cropped axis (exactly ``ndim - axis`` of them). Bottom 1 only gives a shape (no gradient).
    """

    num_bottoms: ClassVar[tuple[int, int | None]] = (2, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.crop_param
        data, ref = self.bottom_shapes
        ndim = len(data)
        start = self.canonical_axis(p.axis)
        offsets = list(p.offset)
        self.check(len(offsets) <= 1 or start + len(offsets) == ndim,
                   f"number of offset values specified ({len(offsets)}) must be equal to the number of "
                   f"dimensions following axis ({ndim - start})")
        self.check(len(ref) >= ndim, f"the reference bottom needs {ndim} axes, has shape {format_shape(ref)}")
        self.offsets = [0] * ndim
        top = list(data)
        for i in range(start, ndim):
            off = offsets[0] if len(offsets) == 1 else offsets[i - start] if offsets else 0
            self.check(data[i] - off >= ref[i], f"the crop for dimension {i} is out-of-bounds with size "
                                                f"{ref[i]} and offset {off}")
            top[i], self.offsets[i] = ref[i], off
        self.top_shapes = [tuple(top)]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        y = bottoms[0]
        for i, (off, size) in enumerate(zip(self.offsets, self.top_shapes[0], strict=True)):
            if off or size != y.shape[i]:
                y = y.narrow(i, off, size)
        return [y]


@register("Tile")
class Tile(Layer):
    """``tile_layer.cpp``: repeat the block ``shape[axis:]`` ``tiles`` times inside each outer index."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.tile_param
        self.axis = self.canonical_axis(p.axis)
        self.check(p.HasField("tiles"), "Number of tiles must be specified")
        self.check(p.tiles > 0, "Number of tiles must be positive")
        self.reps = [1] * len(self.bottom_shapes[0])
        self.reps[self.axis] = p.tiles
        top = list(self.bottom_shapes[0])
        top[self.axis] *= p.tiles
        self.top_shapes = [tuple(top)]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [bottoms[0].repeat(*self.reps)]


# ---------------------------------------------------------------------------------------------------
# Reduction
# ---------------------------------------------------------------------------------------------------
@register("Reduction")
class Reduction(Layer):
    """``reduction_layer.cpp``: reduce all axes from ``axis`` on (SUM, ASUM, SUMSQ, MEAN) times ``coeff``.

    The top keeps ``shape[:axis]`` (a scalar for ``axis: 0``). MEAN is the sum times ``coeff / dim``
    computed in float, as Caffe folds it into ``coeff_``.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.reduction_param
        shape = self.bottom_shapes[0]
        self.op = p.operation
        self.axis = self.canonical_axis(p.axis)
        self.dim = count(shape, self.axis)
        coeff = np.float32(p.coeff)
        if self.op == ReductionOp.MEAN:
            coeff = coeff / np.float32(self.dim) if self.dim else coeff
        self.coeff = float(coeff)
        self.top_shapes = [shape[: self.axis]]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        top = self.live_shape(self.top_shapes[0], bottoms[0])
        x = bottoms[0].reshape(count(top), self.dim)
        if self.op == ReductionOp.ASUM:
            x = x.abs()
        elif self.op == ReductionOp.SUMSQ:
            x = x * x
        y = x.sum(dim=1)
        if self.coeff != 1:
            y = y * self.coeff
        return [y.reshape(top)]


# ---------------------------------------------------------------------------------------------------
# BatchNorm, Scale, Bias
# ---------------------------------------------------------------------------------------------------
@register("BatchNorm")
class BatchNorm(Layer):
    """``batch_norm_layer.cpp``: normalise per channel (axis 1) over N and all spatial positions.

    Blobs (never learned; Caffe forces their ``lr_mult`` to 0 and fills them with zeros): 0 = mean sum,
    1 = variance sum, 2 = scale factor (shape ``(1,)``). ``use_global_stats`` defaults to
    ``phase == TEST``. Global stats: mean/var are the blobs times ``1/factor`` (0 when factor is 0).
    Otherwise the batch mean and biased variance are used, and the blobs are updated in place as
    Caffe does in Forward: ``factor = factor·maf + 1``, ``mean = mean·maf + batch_mean``,
    ``var = var·maf + m/(m-1)·batch_var`` with ``m = N·H·W``. The output is ``(x - mean) / sqrt(var + eps)``;
    autograd of that is Caffe's backward in both modes.
    """

    #: The net must give these blobs lr_mult 0 (Caffe adds ``param { lr_mult: 0 }`` for each).
    fixed_blobs: ClassVar[bool] = True

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.batch_norm_param
        shape = self.bottom_shapes[0]
        self.check(len(shape) >= 2, "BatchNorm needs a bottom with at least 2 axes (N, C, ...)")
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else (
            phase == caffe_pb2.TEST)
        self.maf = p.moving_average_fraction
        self.eps = p.eps
        self.channels = shape[1]
        self.spatial = count(shape, 2)
        for i, spec in enumerate(lp.param[:3]):
            self.check(spec.lr_mult == 0,
                       f"Cannot configure batch normalization statistics as layer parameters "
                       f"(param {i} has lr_mult {spec.lr_mult}, must be 0)")
        self.top_shapes = [shape]

    def blob_specs(self) -> list[BlobSpec]:
        zero = constant_filler(0.0)
        return [BlobSpec((self.channels,), zero), BlobSpec((self.channels,), zero), BlobSpec((1,), zero)]

    @staticmethod
    def _batch_mean(x: torch.Tensor, inv_count: float) -> torch.Tensor:
        """Caffe's two gemv: per (n, c) sums scaled by 1/(N·S), then summed over n."""
        return (x.sum(dim=2) * inv_count).sum(dim=0)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        num = bottoms[0].shape[0]
        x = bottoms[0].reshape(num, self.channels, self.spatial)
        m = num * self.spatial
        inv_count = float(np.float32(1.0 / m)) if m else 0.0
        mean_blob, var_blob, factor = blobs
        if self.use_global_stats:
            f = factor.detach()
            scale = torch.where(f == 0, torch.zeros_like(f), 1 / f)
            mean, var = mean_blob.detach() * scale, var_blob.detach() * scale
            centred = x - mean[:, None]
        else:
            mean = self._batch_mean(x, inv_count)
            centred = x - mean[:, None]
            var = self._batch_mean(centred * centred, inv_count)
            bias_correction = float(np.float32(m) / np.float32(m - 1)) if m > 1 else 1.0
            with torch.no_grad():
                factor.mul_(self.maf).add_(1)
                mean_blob.mul_(self.maf).add_(mean.detach())
                var_blob.mul_(self.maf).add_(var.detach() * bias_correction)
        std = torch.sqrt(var + self.eps)
        return [(centred / std[:, None]).reshape(bottoms[0].shape)]


def _operand_shape(layer: Layer, axis: int, num_axes: int, what: str) -> Shape:
    """Shape of a learned Scale/Bias operand: ``bottom.shape[axis : axis+num_axes]`` (-1 = to the end)."""
    shape = layer.bottom_shapes[0]
    layer.check(num_axes >= -1, "num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
    if num_axes == -1:
        return shape[axis:]
    layer.check(len(shape) >= axis + num_axes,
                f"{what} blob's shape extends past bottom[0]'s shape when applied starting with "
                f"bottom[0] axis = {axis}")
    return shape[axis: axis + num_axes]


def _operand_axis(layer: Layer, axis_param: int, operand: Shape, what: str) -> int:
    """Caffe's Scale/Bias Reshape: where ``operand`` aligns in bottom 0 (axis 0 for a scalar), checked."""
    shape = layer.bottom_shapes[0]
    axis = 0 if len(operand) == 0 else layer.canonical_axis(axis_param)
    layer.check(len(shape) >= axis + len(operand),
                f"{what} blob's shape extends past bottom[0]'s shape when applied starting with "
                f"bottom[0] axis = {axis}")
    for i, d in enumerate(operand):
        layer.check(shape[axis + i] == d, f"dimension mismatch between bottom[0]->shape({axis + i}) = "
                                          f"{shape[axis + i]} and {what}->shape({i}) = {d}")
    return axis


def _broadcastable(operand: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """``operand`` viewed so that it broadcasts against a ``ndim``-axis blob from ``axis`` on."""
    trailing = ndim - axis - operand.dim()
    return operand.reshape(tuple(operand.shape) + (1,) * trailing) if operand.dim() and trailing else operand


@register("Scale")
class Scale(Layer):
    """``scale_layer.cpp``: ``y = x · s (+ b)`` with ``s`` learned or given as bottom 1.

    A learned ``s`` has shape ``bottom.shape[axis : axis+num_axes]`` and filler ``filler`` (constant 1
    when absent, Caffe's identity default). With ``bias_term`` an internal Bias adds ``b`` of shape
    ``bottom.shape[axis : axis+k]`` (k = bottom 1's number of axes, or ``num_axes``), filled by
    ``bias_filler``. Blobs: ``[s, b]``, ``[s]``, ``[b]`` or none.
    """

    num_bottoms: ClassVar[tuple[int, int | None]] = (1, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.scale_param
        self.specs: list[BlobSpec] = []
        if len(self.bottom_shapes) == 1:
            scale_shape = _operand_shape(self, self.canonical_axis(p.axis), p.num_axes, "scale")
            filler = p.filler if p.HasField("filler") else constant_filler(1.0)
            self.specs.append(BlobSpec(scale_shape, filler))
        else:
            scale_shape = self.bottom_shapes[1]
        self.axis = _operand_axis(self, p.axis, scale_shape, "scale")
        self.bias_term = p.bias_term
        if self.bias_term:
            bias_axes = len(self.bottom_shapes[1]) if len(self.bottom_shapes) > 1 else p.num_axes
            bias_shape = _operand_shape(self, self.canonical_axis(p.axis), bias_axes, "bias")
            self.bias_axis = _operand_axis(self, p.axis, bias_shape, "bias")
            self.specs.append(BlobSpec(bias_shape, p.bias_filler))
        self.top_shapes = [self.bottom_shapes[0]]

    def blob_specs(self) -> list[BlobSpec]:
        return list(self.specs)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0]
        scale = bottoms[1] if len(bottoms) > 1 else blobs[0]
        y = x * _broadcastable(scale, x.dim(), self.axis)
        if self.bias_term:
            y = y + _broadcastable(blobs[-1], x.dim(), self.bias_axis)
        return [y]


@register("Bias")
class Bias(Layer):
    """``bias_layer.cpp``: ``y = x + b`` with ``b`` learned (shape ``bottom.shape[axis:axis+num_axes]``,
    filler ``filler``) or given as bottom 1."""

    num_bottoms: ClassVar[tuple[int, int | None]] = (1, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.bias_param
        self.specs: list[BlobSpec] = []
        if len(self.bottom_shapes) == 1:
            bias_shape = _operand_shape(self, self.canonical_axis(p.axis), p.num_axes, "bias")
            self.specs.append(BlobSpec(bias_shape, p.filler))
        else:
            bias_shape = self.bottom_shapes[1]
        self.axis = _operand_axis(self, p.axis, bias_shape, "bias")
        self.top_shapes = [self.bottom_shapes[0]]

    def blob_specs(self) -> list[BlobSpec]:
        return list(self.specs)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0]
        bias = bottoms[1] if len(bottoms) > 1 else blobs[0]
        return [x + _broadcastable(bias, x.dim(), self.axis)]
