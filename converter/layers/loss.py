"""Caffe's loss layers and Accuracy (``src/caffe/layers/*_loss_layer.cpp``, ``accuracy_layer.cpp``).

Every loss layer returns its *unweighted* loss as a 0-dim tensor (Caffe's loss top has 0 axes); the
net multiplies it by ``loss_weight`` (1 by default on top 0, as ``LossLayer::LayerSetUp`` does).
Labels are read as Caffe reads them, ``static_cast<int>(label)`` (truncation towards zero), and never
receive a gradient. Where Caffe's hand-written backward is not the exact gradient of its forward (the
log clamps, ContrastiveLoss's ``1e-4``) a small ``torch.autograd.Function`` reproduces Caffe's backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import read_blobproto
from converter.layers.base import Layer, Shape, count, register

Tensor = torch.Tensor
Normalization = caffe_pb2.LossParameter.NormalizationMode

FLT_MIN = 1.1754943508222875e-38  # <cfloat> FLT_MIN: SoftmaxWithLoss clamps p at it (loss <= 87.3365)
LOG_THRESHOLD = 1e-20  # kLOG_THRESHOLD (loss_layer.hpp): InfogainLoss, MultinomialLogisticLoss


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def legacy_dim(layer: Layer, shape: Shape, index: int) -> int:
    """Caffe's ``Blob::LegacyShape`` (num/channels/height/width): 1 past the last axis, at most 4 axes."""
    layer.check(len(shape) <= 4, f"cannot use legacy accessors on blobs with > 4 axes (shape {shape})")
    return shape[index] if index < len(shape) else 1


def normalization_mode(loss_param: caffe_pb2.LossParameter, fallback: int | None = None) -> int:
    """The LossParameter normalization as SoftmaxWithLoss / SigmoidCrossEntropyLoss read it.

    ``normalization`` wins when set; otherwise the deprecated ``normalize`` (true = VALID, false =
    BATCH_SIZE) when set; otherwise ``fallback`` (SigmoidCrossEntropyLoss: BATCH_SIZE) or the schema
    default (VALID).
    """
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return Normalization.Value("VALID") if loss_param.normalize else Normalization.Value("BATCH_SIZE")
    return loss_param.normalization if fallback is None else fallback


def normalizer(mode: int, outer: int, inner: int, valid: Tensor | None, like: Tensor) -> Tensor:
    """Caffe's ``get_normalizer``: FULL = outer*inner, VALID = #valid (FULL without ignore_label),
    BATCH_SIZE = outer, NONE = 1; never below 1 (a multi-task batch without labels gives 0, not NaN).
    ``valid`` is the non-ignored mask, or None when the layer has no ignore_label."""
    if mode == Normalization.Value("VALID") and valid is not None:
        return valid.sum().to(like.dtype).clamp_min(1.0)
    value = {Normalization.Value("FULL"): outer * inner, Normalization.Value("VALID"): outer * inner,
             Normalization.Value("BATCH_SIZE"): outer, Normalization.Value("NONE"): 1}[mode]
    # a fill on the device: no copy from the host (which would wait, and cannot be captured in a CUDA graph)
    return torch.full((), float(max(1, value)), dtype=like.dtype, device=like.device)


_DEFERRED = [False]


@contextlib.contextmanager
def deferred_label_checks(on: bool = True):
    """Within: label ranges are checked on the device, into a flag per layer (``labels_ok``) that
    :func:`check_deferred_labels` reads later, instead of by reading the labels' range back to the host at
    every pass. The trainer's GPU step reads nothing back (and a CUDA graph cannot hold a host read); it
    reads the flags where it reads its losses. Out-of-range labels are meanwhile clamped into the classes."""
    before, _DEFERRED[0] = _DEFERRED[0], on
    try:
        yield
    finally:
        _DEFERRED[0] = before


def check_deferred_labels(layers) -> None:
    """The one-line error of the first layer whose device-side check saw a label outside its classes."""
    for layer in layers:
        flag = getattr(layer, "labels_ok", None)
        if flag is not None and not bool(flag):
            raise layer.error(f"a label outside [0, {layer.label_classes}) reached this layer (checked on the "
                              "device; found where the losses are read, at a display iteration or within 50 "
                              "iterations)")


def class_labels(layer: Layer, label: Tensor, outer: int, inner: int, num_classes: int,
                 ignore_label: int | None) -> tuple[Tensor, Tensor]:
    """Labels as Caffe reads them: ``(outer, inner)`` ints (truncated), and the non-ignored mask.

    Ignored positions get index 0 (harmless, they are masked). A label outside [0, num_classes) is a
    DCHECK in Caffe (garbage memory in a release build); here it is an error naming the value.
    """
    lab = label.detach().reshape(outer, inner).to(torch.long)
    valid = lab != ignore_label if ignore_label is not None else torch.ones_like(lab, dtype=torch.bool)
    if _DEFERRED[0]:
        # The index clamped into the classes, the flag from comparing it with the label: 4 kernels (6 with an
        # ignore_label) where a mask of the range and a where took 10, and a GPU step is bound by its launches.
        # Ignored positions keep their clamped index: every consumer masks them with ``valid``.
        if getattr(layer, "labels_ok", None) is None:
            layer.labels_ok, layer.label_classes = torch.ones((), dtype=torch.bool, device=lab.device), num_classes
        index = lab.clamp(0, num_classes - 1)
        fits = index == lab
        layer.labels_ok.logical_and_((fits if ignore_label is None else fits | ~valid).all())
        return index, valid
    if ignore_label is None and lab.numel():
        # One pass for the common case; a bad label falls through to the report naming the first one.
        low, high = (int(v) for v in torch.aminmax(lab))
        if low >= 0 and high < num_classes:
            return lab, valid
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        raise layer.error(f"label value {int(lab[bad][0])} outside [0, {num_classes}) "
                          f"(the prediction has {num_classes} classes; ignore_label is {ignore_label})")
    return torch.where(valid, lab, torch.zeros_like(lab)), valid


def _ignore_label(param) -> int | None:
    return param.ignore_label if param.HasField("ignore_label") else None


class _SoftmaxTargetLoss(torch.autograd.Function):
    """``loss = -Σ T·log(max(softmax(x), threshold)) / normalizer`` over (outer, C, inner) positions.

    InfogainLoss is T = H[label] (SoftmaxWithLoss's one-hot T is :class:`_SoftmaxLabelLoss`); ignored
    positions have T = 0.
    Caffe's backward is ``(p·ΣT - T) · top_diff / normalizer`` even where the clamp is active (the exact
    gradient of the clamped log would be 0 there). The probabilities are a second, non-differentiable
    output: Caffe's backward ignores the diff of the optional ``prob`` top.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, target: Tensor, norm: Tensor, threshold: float):
        prob = torch.softmax(scores, dim=1)
        loss = -(target * torch.log(prob.clamp_min(threshold))).sum() / norm
        ctx.save_for_backward(prob, target, norm)
        ctx.mark_non_differentiable(prob)
        return loss, prob

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_prob: Tensor):
        prob, target, norm = ctx.saved_tensors
        grad = (prob * target.sum(1, keepdim=True) - target) * (grad_loss / norm)
        return grad, None, None, None


class _SoftmaxLabelLoss(torch.autograd.Function):
    """:class:`_SoftmaxTargetLoss` for T = one-hot(label) without building T (SoftmaxWithLoss).

    ``scores`` is (outer, C, inner), ``idx`` (outer, 1, inner) class indices, ``weight`` the same shape
    holding 1 (0 where the label is ignored) or None. The loss picks ``log(max(p[label], threshold))``;
    the backward is Caffe's ``p - 1`` at the label and ``p`` elsewhere (0 for an ignored position), times
    ``top_diff / normalizer`` — the values ``p·ΣT - T`` gives, with a gather and a scatter instead of
    C-wide products.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, idx: Tensor, weight: Tensor | None, norm: Tensor, threshold: float):
        prob = torch.softmax(scores, dim=1)
        picked = torch.log(prob.gather(1, idx).clamp_min(threshold))
        if weight is not None:
            picked = picked * weight
        loss = -picked.sum() / norm
        ctx.save_for_backward(prob, idx, weight, norm)
        ctx.mark_non_differentiable(prob)
        return loss, prob

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_prob: Tensor):
        prob, idx, weight, norm = ctx.saved_tensors
        if weight is None:
            grad = prob.clone().scatter_add_(1, idx, torch.full_like(idx, -1, dtype=prob.dtype))
        else:
            grad = (prob * weight).scatter_add_(1, idx, -weight)
        return grad * (grad_loss / norm), None, None, None, None


class _ClampedLog(torch.autograd.Function):
    """``log(max(p, threshold))`` with Caffe's backward ``1 / max(p, threshold)`` (MultinomialLogisticLoss)."""

    @staticmethod
    def forward(ctx, p: Tensor, threshold: float):
        clamped = p.clamp_min(threshold)
        ctx.save_for_backward(clamped)
        return torch.log(clamped)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (clamped,) = ctx.saved_tensors
        return grad / clamped, None


class LossLayer(Layer):
    """Caffe's ``LossLayer``: two bottoms with the same first axis, one scalar top, loss_weight 1.

    Caffe's LossLayer also has ``AutoTopBlobs``: a loss layer written without a top gets an anonymous
    one from the net.
    """

    num_bottoms = (2, 2)
    is_loss = True

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        data, label = self.bottom_shapes[:2]
        self.check(len(data) > 0 and len(label) > 0 and data[0] == label[0],
                   "the data and label should have the same first dimension")
        self.top_shapes = [()]


class _SoftmaxFamily(LossLayer):
    """Shared setup of SoftmaxWithLoss and InfogainLoss: class axis, outer/inner counts, labels, top 1."""

    num_tops = (1, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int, axis: int,
                 what: str):
        super().__init__(lp, bottom_shapes, phase)
        data, label = self.bottom_shapes[:2]
        self.ignore_label = _ignore_label(lp.loss_param)
        self.axis = self.canonical_axis(axis)
        self.outer, self.channels, self.inner = count(data, 0, self.axis), data[self.axis], \
            count(data, self.axis + 1)
        self.check(self.outer * self.inner == count(label),
                   f"number of labels ({count(label)}) must match number of predictions "
                   f"({self.outer * self.inner}): with {what} axis {self.axis} the label count must be the "
                   f"product of the prediction's other axes, with integer values in 0..{self.channels - 1}")
        if len(lp.top) > 1:
            self.top_shapes.append(data)

    def _loss(self, x: Tensor, label: Tensor, rows: Tensor | None, threshold: float) -> list[Tensor]:
        """Loss (and probabilities) with T = rows[label] (one-hot when ``rows`` is None)."""
        idx, valid = class_labels(self, label, self.outer, self.inner, self.channels, self.ignore_label)
        scores = x.reshape(self.outer, self.channels, self.inner)
        if rows is None:
            norm = normalizer(self.normalization, self.outer, self.inner,
                              valid if self.ignore_label is not None else None, x)
            weight = None if self.ignore_label is None else valid.unsqueeze(1).to(x.dtype)
            loss, prob = _SoftmaxLabelLoss.apply(scores, idx.unsqueeze(1), weight, norm, threshold)
            return [loss, prob.reshape(x.shape)][: len(self.top_shapes)]
        target = rows.to(x.dtype)[idx]
        target = (target * valid.unsqueeze(-1).to(x.dtype)).permute(0, 2, 1)
        norm = normalizer(self.normalization, self.outer, self.inner,
                          valid if self.ignore_label is not None else None, x)
        loss, prob = _SoftmaxTargetLoss.apply(scores, target, norm, threshold)
        return [loss, prob.reshape(x.shape)][: len(self.top_shapes)]


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_SoftmaxFamily):
    """softmax_loss_layer.cpp: ``-Σ log(max(p[label], FLT_MIN)) / normalizer`` over non-ignored positions.

    The class axis is ``softmax_param.axis``; normalization from LossParameter (deprecated ``normalize``
    only when ``normalization`` is unset). Optional top 1 = the softmax probabilities.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase, lp.softmax_param.axis, "softmax")
        self.normalization = normalization_mode(lp.loss_param)

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        return self._loss(bottoms[0], bottoms[1], None, FLT_MIN)


@register("InfogainLoss")
class InfogainLoss(_SoftmaxFamily):
    """infogain_loss_layer.cpp (Caffe 1.0: softmax inside the layer):
    ``-Σ_l H[label, l] · log(max(p_l, 1e-20)) / normalizer``.

    H (C×C) comes from the third bottom, or from ``infogain_loss_param.source`` (a BlobProto, read at
    setup, the path relative to the current directory as in Caffe). ``normalize`` is refused as in
    Caffe; the class axis is ``infogain_loss_param.axis``.
    """

    num_bottoms = (2, 3)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase, lp.infogain_loss_param.axis, "infogain")
        self.check(not lp.loss_param.HasField("normalize"), 'normalize is deprecated. use "normalization"')
        self.normalization = lp.loss_param.normalization
        want = self.channels * self.channels
        if len(self.bottom_shapes) < 3:
            self.check(lp.infogain_loss_param.HasField("source"), "infogain matrix source must be specified")
            try:
                matrix = read_blobproto(lp.infogain_loss_param.source)
            except CaffeError as e:
                raise self.error(f"cannot read the infogain matrix: {e}") from None
            self.check(matrix.size == want, f"the infogain matrix {lp.infogain_loss_param.source} has "
                       f"shape {matrix.shape}; it must be {self.channels}x{self.channels}")
            self.register_buffer("infogain", torch.from_numpy(matrix.reshape(self.channels, self.channels)),
                                 persistent=False)
        else:
            self.check(count(self.bottom_shapes[2]) == want,
                       f"the infogain bottom must hold {self.channels}x{self.channels} values")
            self.infogain = None

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        rows = self.infogain if self.infogain is not None else bottoms[2].detach()
        return self._loss(bottoms[0], bottoms[1], rows.reshape(self.channels, self.channels), LOG_THRESHOLD)


@register("Accuracy")
class Accuracy(Layer):
    """accuracy_layer.cpp: a labelled position is correct iff fewer than ``top_k`` *other* classes score
    ``>=`` the true class (ties count against you: all-equal scores are wrong). Ignored labels are
    skipped; accuracy = correct / count (0 when count is 0); optional top 1 = per-class accuracy.
    Forward only (no gradient)."""

    num_bottoms = (2, 2)
    num_tops = (1, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.accuracy_param
        data, label = self.bottom_shapes
        self.top_k = p.top_k
        self.ignore_label = _ignore_label(p)
        self.check(count(label) > 0 and self.top_k <= count(data) // count(label),
                   f"top_k ({self.top_k}) must be less than or equal to the number of classes")
        self.axis = self.canonical_axis(p.axis)
        self.outer, self.channels, self.inner = count(data, 0, self.axis), data[self.axis], \
            count(data, self.axis + 1)
        self.check(self.outer * self.inner == count(label),
                   f"number of labels ({count(label)}) must match number of predictions "
                   f"({self.outer * self.inner}): with label axis {self.axis} the label count must be the "
                   f"product of the prediction's other axes, with integer values in 0..{self.channels - 1}")
        self.top_shapes = [(), (self.channels,)][: len(lp.top)]

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        x = bottoms[0].detach()
        idx, valid = class_labels(self, bottoms[1], self.outer, self.inner, self.channels, self.ignore_label)
        scores = x.reshape(self.outer, self.channels, self.inner)
        true_score = scores.gather(1, idx.unsqueeze(1))
        better = (scores >= true_score).sum(1) - 1  # the true class counts itself
        correct = (better < self.top_k) & valid
        n = valid.sum()
        accuracy = torch.where(n > 0, correct.sum().to(x.dtype) / n.clamp_min(1), torch.zeros((), dtype=x.dtype,
                               device=x.device))
        tops = [accuracy]
        if len(self.top_shapes) > 1:
            onehot = F.one_hot(idx, self.channels).to(x.dtype)
            nums = (onehot * valid.unsqueeze(-1)).sum((0, 1))
            hits = (onehot * correct.unsqueeze(-1)).sum((0, 1))
            tops.append(torch.where(nums > 0, hits / nums.clamp_min(1), torch.zeros_like(nums)))
        return tops


class _ContrastiveLoss(torch.autograd.Function):
    """contrastive_loss_layer.cpp forward and Caffe's own backward.

    Dissimilar pairs inside the margin get ``-(top_diff/N) · (m-d)/(d+1e-4) · (a-b)`` (the ``1e-4``
    keeps it finite at d = 0 and makes it differ from the exact gradient), legacy ``-(top_diff/N)·(a-b)``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, similar: Tensor, margin: float, legacy: bool):
        diff = a - b
        dist_sq = (diff * diff).sum(1)
        if legacy:
            dissimilar = (margin - dist_sq).clamp_min(0.0)
        else:
            dissimilar = (margin - torch.sqrt(dist_sq)).clamp_min(0.0) ** 2
        loss = torch.where(similar, dist_sq, dissimilar).sum() / a.shape[0] / 2
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        diff, dist_sq, similar = ctx.saved_tensors
        alpha = grad / diff.shape[0]
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = (-alpha).expand_as(mdist)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            beta = -alpha * mdist / (dist + 1e-4)
        coef = torch.where(similar, alpha.expand_as(mdist), torch.where(mdist > 0, beta, torch.zeros_like(beta)))
        grad_a = coef.unsqueeze(1) * diff
        return grad_a, -grad_a, None, None, None


@register("ContrastiveLoss")
class ContrastiveLoss(LossLayer):
    """contrastive_loss_layer.cpp: ``1/(2N) Σ [y d² + (1-y) max(m - d, 0)²]`` with y = int(bottom 2) != 0;
    ``legacy_version``: dissimilar term ``max(m - d², 0)``. Features are (N, C) or (N, C, 1, 1)."""

    num_bottoms = (3, 3)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        a, b, sim = self.bottom_shapes
        self.channels = legacy_dim(self, a, 1)
        self.check(self.channels == legacy_dim(self, b, 1), "the two feature bottoms must have the same channels")
        for s in (a, b):
            self.check(legacy_dim(self, s, 2) == 1 and legacy_dim(self, s, 3) == 1,
                       "features must be (N, C) or (N, C, 1, 1)")
        self.check(all(legacy_dim(self, sim, i) == 1 for i in (1, 2, 3)) and count(sim) == a[0],
                   "the similarity bottom must hold one value per pair (N, or N x 1 x 1 x 1)")
        self.margin = lp.contrastive_loss_param.margin
        self.legacy = lp.contrastive_loss_param.legacy_version

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        a, b, sim = bottoms
        n = a.shape[0]
        similar = sim.detach().reshape(n).to(torch.long) != 0
        return [_ContrastiveLoss.apply(a.reshape(n, self.channels), b.reshape(n, self.channels), similar,
                                       self.margin, self.legacy)]


@register("EuclideanLoss")
class EuclideanLoss(LossLayer):
    """euclidean_loss_layer.cpp: ``Σ (a - b)² / (2N)``; both bottoms get a gradient (Caffe allows force
    backward into the second one, e.g. for a learned target)."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        a, b = self.bottom_shapes
        self.check(count(a, 1) == count(b, 1), "inputs must have the same dimension")

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        a, b = bottoms
        n = a.shape[0]
        diff = a.reshape(n, -1) - b.reshape(n, -1)
        return [(diff * diff).sum() / n / 2]


class _SigmoidCrossEntropy(torch.autograd.Function):
    """sigmoid_cross_entropy_loss_layer.cpp: the stable formula
    ``-Σ [x (t - [x>=0]) - log(1 + exp(x - 2x[x>=0]))] / normalizer`` and Caffe's backward
    ``(sigmoid(x) - t) · top_diff / normalizer``, zero at ignored targets."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, valid: Tensor, norm: Tensor):
        pos = (x >= 0).to(x.dtype)
        term = x * (target - pos) - torch.log(1 + torch.exp(x - 2 * x * pos))
        loss = -torch.where(valid, term, torch.zeros_like(term)).sum() / norm
        ctx.save_for_backward(x, target, valid, norm)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, target, valid, norm = ctx.saved_tensors
        sigmoid = 0.5 * torch.tanh(0.5 * x) + 0.5  # Caffe's sigmoid() (sigmoid_layer.cpp)
        diff = torch.where(valid, sigmoid - target, torch.zeros_like(x))
        return diff * (grad / norm), None, None, None


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """sigmoid_cross_entropy_loss_layer.cpp: per-element logistic loss against targets in [0, 1].

    Normalization: ``normalization`` if set, else ``normalize`` (true VALID, false BATCH_SIZE) if set,
    else BATCH_SIZE -- this layer's C++ default, not the schema's VALID. ``ignore_label`` compares
    int(target).
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        x, t = self.bottom_shapes
        self.check(count(x) == count(t), "SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count")
        self.outer, self.inner = x[0], count(x, 1)
        self.ignore_label = _ignore_label(lp.loss_param)
        self.normalization = normalization_mode(lp.loss_param, Normalization.Value("BATCH_SIZE"))

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        target = bottoms[1].detach().reshape(x.shape).to(x.dtype)
        if self.ignore_label is not None:
            valid = target.to(torch.long) != self.ignore_label
        else:
            valid = torch.ones_like(target, dtype=torch.bool)
        norm = normalizer(self.normalization, self.outer, self.inner,
                          valid if self.ignore_label is not None else None, x)
        return [_SigmoidCrossEntropy.apply(x, target, valid, norm)]


def _first_labels(layer: Layer, label: Tensor, num: int, dim: int) -> Tensor:
    """``static_cast<int>(label[i])`` for i < num (flat index, as HingeLoss/MultinomialLogisticLoss read it)."""
    return class_labels(layer, label.reshape(-1)[:num], num, 1, dim, None)[0].reshape(num)


@register("HingeLoss")
class HingeLoss(LossLayer):
    """hinge_loss_layer.cpp: ``t_ij = max(0, 1 + δ_ij x_ij)`` with δ = -1 at the label, +1 elsewhere;
    L1: ``Σ t / N``, L2: ``Σ t² / N``. The relu's zero gradient at t = 0 matches Caffe's sign(0) = 0."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        self.num = self.bottom_shapes[0][0]
        self.dim = count(self.bottom_shapes[0]) // self.num if self.num else 0
        self.l2 = lp.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.Norm.Value("L2")

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        x = bottoms[0].reshape(self.num, self.dim)
        label = _first_labels(self, bottoms[1], self.num, self.dim)
        sign = 1 - 2 * F.one_hot(label, self.dim).to(x.dtype)
        margin = torch.relu(1 + x * sign)
        return [((margin * margin) if self.l2 else margin).sum() / self.num]


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LossLayer):
    """multinomial_logistic_loss_layer.cpp: ``-Σ log(max(p[label], 1e-20)) / N`` on probabilities (no
    softmax); labels (N, 1, 1, 1)."""

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        label = self.bottom_shapes[1]
        self.check(all(legacy_dim(self, label, i) == 1 for i in (1, 2, 3)),
                   "the label bottom must be N or N x 1 x 1 x 1")
        self.num = self.bottom_shapes[0][0]
        self.dim = count(self.bottom_shapes[0]) // self.num if self.num else 0

    def forward(self, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        p = bottoms[0].reshape(self.num, self.dim)
        label = _first_labels(self, bottoms[1], self.num, self.dim)
        chosen = p.gather(1, label.unsqueeze(1))
        return [-_ClampedLog.apply(chosen, LOG_THRESHOLD).sum() / self.num]
