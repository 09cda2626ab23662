"""Loss layers and Accuracy: BVLC Caffe's own outputs (golden case ``loss``) plus hand-computed rules.

Every expected value below is written out by hand or computed with numpy from Caffe's formulas in
``src/caffe/layers/*_loss_layer.cpp`` / ``accuracy_layer.cpp``, never with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.layers import layer_class
from tests.golden import GOLDEN, check_layers_of_case, require_golden

FLT_MIN = np.finfo(np.float32).tiny


def build(text: str, *shapes: tuple[int, ...], phase: int = caffe_pb2.TRAIN):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "l"
    return layer_class(lp)(lp, list(shapes), phase)


def softmax_loss(extra: str = "", tops: int = 1) -> str:
    top = "".join(f' top: "t{i}"' for i in range(tops))
    return f'type: "SoftmaxWithLoss" bottom: "x" bottom: "y"{top} {extra}'


def np_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def run(layer, *arrays, grad: bool = True):
    bottoms = [torch.tensor(np.asarray(a, dtype=np.float32), requires_grad=grad) for a in arrays]
    tops = layer(bottoms, [])
    return bottoms, tops


# ---------------------------------------------------------------------------------------------
# Golden: BVLC Caffe 1.0
# ---------------------------------------------------------------------------------------------
def test_golden_loss_layers(monkeypatch):
    require_golden()
    monkeypatch.chdir(GOLDEN / "loss")  # infogain_loss_param.source is relative, as Caffe resolves it
    checked = check_layers_of_case("loss", "net.prototxt")
    assert len(checked) == 12


def test_golden_accuracy():
    checked = check_layers_of_case("loss", "net_fwd.prototxt", backward=False)
    assert checked == ["accuracy_top1", "accuracy_top3"]


# ---------------------------------------------------------------------------------------------
# SoftmaxWithLoss
# ---------------------------------------------------------------------------------------------
SCORES = np.array([[2.0, 1.0, 0.1], [0.5, 0.5, 3.0], [1.0, -1.0, 0.0], [0.2, 0.3, 0.4]], dtype=np.float32)
LABELS = np.array([0, 255, 2, 1], dtype=np.float32)


def _expected_softmax_loss(normalizer: float) -> tuple[float, np.ndarray]:
    p = np_softmax(SCORES.astype(np.float64))
    valid = LABELS != 255
    idx = np.where(valid, LABELS, 0).astype(int)
    loss = -np.log(p[np.arange(4), idx])[valid].sum() / normalizer
    onehot = np.eye(3)[idx]
    grad = (p - onehot) * valid[:, None] / normalizer
    return loss, grad


@pytest.mark.parametrize("mode, normalizer", [("FULL", 4), ("VALID", 3), ("BATCH_SIZE", 4), ("NONE", 1)])
def test_softmax_loss_normalization_with_ignore_label(mode, normalizer):
    layer = build(softmax_loss(f"loss_param {{ ignore_label: 255 normalization: {mode} }}"), (4, 3), (4,))
    (x, y), (loss,) = run(layer, SCORES, LABELS)
    assert loss.shape == ()
    expected, grad = _expected_softmax_loss(normalizer)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-6)
    (loss * 2.0).backward()  # top diff = loss_weight 2
    np.testing.assert_allclose(x.grad.numpy(), 2.0 * grad, rtol=1e-5, atol=1e-7)
    assert not x.grad.numpy()[1].any()  # the ignored row
    assert y.grad is None  # labels never get a gradient


@pytest.mark.parametrize("param, normalizer", [
    ("", 3),                                                  # schema default VALID
    ("normalize: false", 4),                                  # deprecated: false = BATCH_SIZE
    ("normalize: true", 3),                                   # deprecated: true = VALID
    ("normalize: false normalization: NONE", 1),              # normalization wins when set
    ("normalize: false normalization: VALID", 3),
])
def test_softmax_loss_deprecated_normalize(param, normalizer):
    layer = build(softmax_loss(f"loss_param {{ ignore_label: 255 {param} }}"), (4, 3), (4,))
    _, (loss,) = run(layer, SCORES, LABELS)
    np.testing.assert_allclose(loss.item(), _expected_softmax_loss(normalizer)[0], rtol=1e-6)


def test_softmax_loss_valid_without_ignore_label_is_full():
    labels = np.array([0, 1, 2, 1], dtype=np.float32)
    layer = build(softmax_loss(), (4, 3), (4,))
    _, (loss,) = run(layer, SCORES, labels)
    p = np_softmax(SCORES.astype(np.float64))
    np.testing.assert_allclose(loss.item(), -np.log(p[np.arange(4), labels.astype(int)]).mean(), rtol=1e-6)


def test_softmax_loss_all_ignored_normalizer_is_one():
    layer = build(softmax_loss("loss_param { ignore_label: -1 }"), (2, 3), (2,))
    (x, _), (loss,) = run(layer, SCORES[:2], [-1, -1])
    assert loss.item() == 0.0
    loss.backward()
    assert not x.grad.numpy().any() and np.isfinite(x.grad.numpy()).all()


def test_softmax_loss_flt_min_clamp_and_caffe_backward():
    # p(label) underflows to exactly 0 in float32: Caffe's loss is -log(FLT_MIN) = 87.3365 per sample,
    # and its backward is still p - 1 = -1 at the label (not the clamp's zero gradient).
    scores = np.array([[0.0, -200.0], [0.0, -200.0]], dtype=np.float32)
    layer = build(softmax_loss(), (2, 2), (2,))
    (x, _), (loss,) = run(layer, scores, [1, 1])
    np.testing.assert_allclose(loss.item(), 87.3365, rtol=1e-6)
    np.testing.assert_allclose(loss.item(), -np.log(np.float64(FLT_MIN)), rtol=1e-6)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.5, -0.5], [0.5, -0.5]], atol=1e-7)


def test_softmax_loss_label_truncated_to_int():
    layer = build(softmax_loss(), (1, 3), (1,))
    _, (loss,) = run(layer, SCORES[:1], [1.9])  # static_cast<int>(1.9) = 1
    p = np_softmax(SCORES[:1].astype(np.float64))
    np.testing.assert_allclose(loss.item(), -np.log(p[0, 1]), rtol=1e-6)


def test_softmax_loss_spatial_axis_and_prob_top():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    y = rng.integers(0, 3, (2, 1, 2, 2)).astype(np.float32)
    layer = build(softmax_loss("", tops=2), (2, 3, 2, 2), (2, 1, 2, 2))
    assert layer.top_shapes == [(), (2, 3, 2, 2)]
    (xt, _), (loss, prob) = run(layer, x, y)
    p = np_softmax(x.astype(np.float64), axis=1)
    picked = np.take_along_axis(p, y.astype(int), axis=1)
    np.testing.assert_allclose(loss.item(), -np.log(picked).sum() / 8, rtol=1e-6)
    np.testing.assert_allclose(prob.detach().numpy(), p, rtol=1e-5)
    assert not prob.requires_grad  # Caffe's backward ignores the diff of the prob top


def test_softmax_loss_softmax_param_axis():
    # class axis from softmax_param.axis: scores (N=2, inner=3, C=4) with axis 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    y = rng.integers(0, 4, (2, 3)).astype(np.float32)
    layer = build(softmax_loss("softmax_param { axis: -1 }"), (2, 3, 4), (2, 3))
    _, (loss,) = run(layer, x, y)
    p = np_softmax(x.astype(np.float64), axis=2)
    picked = np.take_along_axis(p, y.astype(int)[..., None], axis=2)
    np.testing.assert_allclose(loss.item(), -np.log(picked).mean(), rtol=1e-6)


def test_softmax_loss_errors_name_both_shapes():
    with pytest.raises(CaffeError, match=r"number of labels \(22\) must match number of predictions \(12\)"
                       r".*bottom shapes: 2x3x2x3, 2x1x11"):
        build(softmax_loss(), (2, 3, 2, 3), (2, 1, 11))
    with pytest.raises(CaffeError, match=r"same first dimension.*bottom shapes: 6x5, 7"):
        build(softmax_loss(), (6, 5), (7,))
    with pytest.raises(CaffeError, match=r"takes 1..2 top"):
        build(softmax_loss("", tops=3), (6, 5), (6,))
    layer = build(softmax_loss(), (2, 3), (2,))
    with pytest.raises(CaffeError, match=r"label value 3 outside \[0, 3\)"):
        run(layer, SCORES[:2], [0, 3])


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------
def accuracy(extra: str, tops: int = 1) -> str:
    top = "".join(f' top: "a{i}"' for i in range(tops))
    return f'type: "Accuracy" bottom: "x" bottom: "y"{top} accuracy_param {{ {extra} }}'


def test_accuracy_ties_count_against_you():
    scores = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0], [3.0, 1.0, 2.0], [5.0, 5.0, 0.0]], np.float32)
    labels = np.array([0, 2, 0, 1], np.float32)
    # row 0: all equal -> 3 classes >= label's -> wrong for top 1 and top 2, right for top 3
    # row 1: tie with class 1 -> wrong for top 1 (argmax would pick 1 != 2 anyway), right for top 2
    # row 2: clear winner -> right; row 3: tie between 0 and 1, label 1 -> wrong for top 1
    for k, expected in [(1, 1 / 4), (2, 3 / 4), (3, 1.0)]:
        layer = build(accuracy(f"top_k: {k}"), (4, 3), (4,))
        _, (acc,) = run(layer, scores, labels, grad=False)
        assert acc.shape == ()
        np.testing.assert_allclose(acc.item(), expected, rtol=1e-7)


def test_accuracy_per_class_ignore_and_empty():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8],
                       [0.1, 0.8, 0.1]], np.float32)
    labels = np.array([0, 1, 1, 7, 0], np.float32)
    layer = build(accuracy("ignore_label: 7", tops=2), (5, 3), (5,))
    assert layer.top_shapes == [(), (3,)]
    _, (acc, per_class) = run(layer, scores, labels, grad=False)
    np.testing.assert_allclose(acc.item(), 2 / 4, rtol=1e-7)  # rows 0, 1 right; 2, 4 wrong; 3 ignored
    np.testing.assert_allclose(per_class.numpy(), [1 / 2, 1 / 2, 0.0], rtol=1e-7)  # class 2: no samples -> 0
    layer = build(accuracy("ignore_label: 7", tops=2), (2, 3), (2,))
    _, (acc, per_class) = run(layer, scores[:2], [7, 7], grad=False)
    assert acc.item() == 0.0 and not per_class.numpy().any()


def test_accuracy_spatial_axis():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)  # N=2, C=4, inner=3
    y = rng.integers(0, 4, (2, 3)).astype(np.float32)
    layer = build(accuracy("top_k: 2"), (2, 4, 3), (2, 3))
    _, (acc,) = run(layer, x, y, grad=False)
    true = np.take_along_axis(x, y.astype(int)[:, None, :], axis=1)
    right = ((x >= true).sum(axis=1) - 1) < 2
    np.testing.assert_allclose(acc.item(), right.mean(), rtol=1e-7)


def test_accuracy_errors():
    with pytest.raises(CaffeError, match=r"top_k \(4\) must be less than or equal to the number of classes"):
        build(accuracy("top_k: 4"), (5, 3), (5,))
    with pytest.raises(CaffeError, match=r"number of labels \(4\) must match number of predictions \(5\)"
                       r".*bottom shapes: 5x3, 4"):
        build(accuracy(""), (5, 3), (4,))


# ---------------------------------------------------------------------------------------------
# ContrastiveLoss
# ---------------------------------------------------------------------------------------------
A = np.array([[0.0, 0.0], [1.0, 0.0], [0.1, 0.2], [0.0, 0.0], [2.0, 1.0]], np.float32)
B = np.array([[0.3, 0.4], [0.0, 0.0], [0.1, 0.2], [0.6, 0.0], [0.0, 0.0]], np.float32)
SIM = np.array([1, 0.7, 0, 0, 0], np.float32)  # 0.7 -> int 0 -> dissimilar


def contrastive(extra: str = "") -> str:
    return (f'type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "l" '
            f'contrastive_loss_param {{ {extra} }}')


def test_contrastive_forward_and_caffe_backward():
    layer = build(contrastive("margin: 1.5"), (5, 2, 1, 1), (5, 2, 1, 1), (5, 1, 1, 1))
    (a, b, y), (loss,) = run(layer, A.reshape(5, 2, 1, 1), B.reshape(5, 2, 1, 1), SIM.reshape(5, 1, 1, 1))
    d = np.sqrt(((A - B).astype(np.float64) ** 2).sum(1))
    # rows: similar (d=0.5); dissimilar d=1 (inside); dissimilar d=0 (inside); d=0.6 (inside); d=sqrt5 (out)
    terms = [d[0] ** 2] + [max(1.5 - di, 0) ** 2 for di in d[1:]]
    np.testing.assert_allclose(loss.item(), sum(terms) / 5 / 2, rtol=1e-6)
    loss.backward()
    coef = np.array([1.0] + [-(1.5 - di) / (di + 1e-4) if 1.5 - di > 0 else 0.0 for di in d[1:]]) / 5
    expected = coef[:, None] * (A - B)
    np.testing.assert_allclose(a.grad.numpy().reshape(5, 2), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.grad.numpy().reshape(5, 2), -expected, rtol=1e-5, atol=1e-7)
    assert y.grad is None
    # d = 0 for an identical dissimilar pair: Caffe's 1e-4 gives -(m/1e-4)/N * 0 = 0, finite
    assert np.isfinite(a.grad.numpy()).all()
    # and the 1e-4 makes it differ from the exact gradient -(m-d)/d (here row 3, d = 0.6)
    exact = -(1.5 - d[3]) / d[3] / 5 * (A[3] - B[3])
    assert not np.allclose(a.grad.numpy().reshape(5, 2)[3], exact, rtol=1e-5, atol=0)


def test_contrastive_legacy_version():
    layer = build(contrastive("margin: 1.5 legacy_version: true"), (5, 2), (5, 2), (5,))
    (a, b, _), (loss,) = run(layer, A, B, SIM)
    d2 = ((A - B).astype(np.float64) ** 2).sum(1)
    terms = [d2[0]] + [max(1.5 - v, 0) for v in d2[1:]]
    np.testing.assert_allclose(loss.item(), sum(terms) / 5 / 2, rtol=1e-6)
    loss.backward()
    coef = np.array([1.0] + [-1.0 if 1.5 - v > 0 else 0.0 for v in d2[1:]]) / 5
    np.testing.assert_allclose(a.grad.numpy(), coef[:, None] * (A - B), rtol=1e-6, atol=1e-7)


def test_contrastive_errors():
    with pytest.raises(CaffeError, match="features must be"):
        build(contrastive(), (5, 2, 2, 1), (5, 2, 2, 1), (5,))
    with pytest.raises(CaffeError, match="same channels"):
        build(contrastive(), (5, 2), (5, 3), (5,))
    with pytest.raises(CaffeError, match="takes 3 bottom"):
        build('type: "ContrastiveLoss" bottom: "a" bottom: "b" top: "l"', (5, 2), (5, 2))


# ---------------------------------------------------------------------------------------------
# EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss, MultinomialLogisticLoss, InfogainLoss
# ---------------------------------------------------------------------------------------------
def test_euclidean_flattens_and_checks_dimension():
    layer = build('type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"', (2, 3), (2, 3, 1, 1))
    a, b = A[:2, :1].repeat(3, 1), B[:2, :1].repeat(3, 1)
    (ta, tb), (loss,) = run(layer, a, b.reshape(2, 3, 1, 1))
    np.testing.assert_allclose(loss.item(), ((a - b) ** 2).sum() / 4, rtol=1e-6)
    loss.backward()
    np.testing.assert_allclose(tb.grad.numpy().reshape(2, 3), -(a - b) / 2, rtol=1e-6)
    with pytest.raises(CaffeError, match="same dimension"):
        build('type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"', (2, 3), (2, 4))


def sce(extra: str = "") -> str:
    return f'type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" {extra}'


X_SCE = np.array([[-3.0, 0.5, 20.0], [0.0, -40.0, 2.0]], np.float32)
T_SCE = np.array([[0.0, 1.0, 0.3], [-1.0, 1.0, 0.0]], np.float32)


@pytest.mark.parametrize("param, normalizer, ignore", [
    ("", 2, False),                                                           # C++ default BATCH_SIZE
    ("loss_param { normalize: true }", 6, False),                             # VALID = all 6
    ("loss_param { ignore_label: -1 normalization: VALID }", 5, True),
    ("loss_param { ignore_label: -1 normalization: FULL }", 6, True),
    ("loss_param { ignore_label: -1 }", 2, True),                             # still BATCH_SIZE
    ("loss_param { ignore_label: -1 normalization: NONE }", 1, True),
])
def test_sigmoid_cross_entropy(param, normalizer, ignore):
    layer = build(sce(param), (2, 3), (2, 3))
    (x, t), (loss,) = run(layer, X_SCE, T_SCE)
    x64, t64 = X_SCE.astype(np.float64), T_SCE.astype(np.float64)
    p = 1 / (1 + np.exp(-x64))
    per = -(t64 * np.log(p) + (1 - t64) * np.log1p(-p))
    per[1, 1] = 40.0  # log1p(-p) loses it in float64 too: x=-40, t=1 -> loss = 40 + log(1+e^-40)
    valid = np.ones_like(per, bool)
    if ignore:
        valid[1, 0] = False
    np.testing.assert_allclose(loss.item(), per[valid].sum() / normalizer, rtol=1e-5)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), (p - t64) * valid / normalizer, rtol=1e-5, atol=1e-7)
    assert t.grad is None


def test_sigmoid_cross_entropy_count_check():
    with pytest.raises(CaffeError, match="must have the same count"):
        build(sce(), (2, 3), (2, 4))


def test_hinge_loss_l1_l2():
    x = np.array([[0.5, -2.0, 0.3], [1.0, 0.2, -1.0]], np.float32)
    y = np.array([0, 2], np.float32)
    sign = np.where(np.eye(3)[y.astype(int)] > 0, -1.0, 1.0)
    t = np.maximum(0, 1 + sign * x)  # [[0.5, 0, 1.3], [2, 1.2, 2]]
    for norm, value, grad in [("L1", t.sum() / 2, (t > 0) * sign / 2),
                              ("L2", (t ** 2).sum() / 2, 2 * t * sign / 2)]:
        layer = build(f'type: "HingeLoss" bottom: "x" bottom: "y" top: "l" hinge_loss_param {{ norm: {norm} }}',
                      (2, 3), (2,))
        (xt, _), (loss,) = run(layer, x, y)
        np.testing.assert_allclose(loss.item(), value, rtol=1e-6)
        loss.backward()
        np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-6)


def test_multinomial_logistic_loss_clamp():
    p = np.array([[0.2, 0.8], [0.0, 1.0]], np.float32)
    layer = build('type: "MultinomialLogisticLoss" bottom: "p" bottom: "y" top: "l"', (2, 2), (2, 1, 1, 1))
    (pt, _), (loss,) = run(layer, p, np.array([1, 0], np.float32).reshape(2, 1, 1, 1))
    np.testing.assert_allclose(loss.item(), -(np.log(0.8) + np.log(1e-20)) / 2, rtol=1e-6)
    loss.backward()
    # Caffe: diff = -(1/N) / max(p, 1e-20) at the label, 0 elsewhere -- even where the clamp is active
    np.testing.assert_allclose(pt.grad.numpy(), [[0, -0.5 / 0.8], [-0.5 / np.float32(1e-20), 0]], rtol=1e-6)
    with pytest.raises(CaffeError, match="label bottom must be"):
        build('type: "MultinomialLogisticLoss" bottom: "p" bottom: "y" top: "l"', (2, 2), (2, 2))


def infogain(extra: str = "", bottoms: int = 2) -> str:
    b = "".join(f' bottom: "b{i}"' for i in range(bottoms))
    return f'type: "InfogainLoss"{b} top: "l" {extra}'


def test_infogain_loss_third_bottom_ignore_and_normalization():
    h = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.1], [0.0, 0.3, 2.0]], np.float32)
    layer = build(infogain("loss_param { ignore_label: 255 normalization: BATCH_SIZE }", 3), (4, 3), (4,), (3, 3))
    (x, _, ht), (loss,) = run(layer, SCORES, LABELS, h)
    p = np_softmax(SCORES.astype(np.float64))
    valid = LABELS != 255
    idx = np.where(valid, LABELS, 0).astype(int)
    rows = h[idx] * valid[:, None]
    np.testing.assert_allclose(loss.item(), -(rows * np.log(p)).sum() / 4, rtol=1e-6)
    loss.backward()
    expected = (p * rows.sum(1, keepdims=True) - rows) / 4
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert ht.grad is None  # Caffe cannot back-propagate into H


def test_infogain_loss_errors(tmp_path, monkeypatch):
    with pytest.raises(CaffeError, match="infogain matrix source must be specified"):
        build(infogain(), (4, 3), (4,))
    with pytest.raises(CaffeError, match="normalize is deprecated"):
        build(infogain("loss_param { normalize: true }", 3), (4, 3), (4,), (3, 3))
    with pytest.raises(CaffeError, match="must hold 3x3 values"):
        build(infogain("", 3), (4, 3), (4,), (2, 2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaffeError, match=r"cannot read the infogain matrix: H.binaryproto: no such file"):
        build(infogain('infogain_loss_param { source: "H.binaryproto" }'), (4, 3), (4,))
    blob = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2, data=[1, 0, 0, 1])
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    with pytest.raises(CaffeError, match=r"must be 3x3"):
        build(infogain('infogain_loss_param { source: "H.binaryproto" }'), (4, 3), (4,))


def test_loss_layers_are_losses_with_scalar_tops():
    for text, shapes in [(softmax_loss(), [(4, 3), (4,)]), (sce(), [(2, 3), (2, 3)]),
                         (contrastive(), [(5, 2), (5, 2), (5,)])]:
        layer = build(text, *shapes)
        assert type(layer).is_loss and layer.top_shapes[0] == ()
    assert not type(build(accuracy(""), (4, 3), (4,))).is_loss


# ---------------------------------------------------------------------------------------------
# Labels checked on the device (the trainer's GPU mode): same numbers, the range in a flag
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shapes", [
    (softmax_loss("loss_param { ignore_label: 255 normalization: VALID }", tops=2), [(6, 4), (6,)]),
    (softmax_loss(), [(6, 4), (6,)]),
    (accuracy("ignore_label: 255", tops=2), [(6, 4), (6,)]),
])
def test_labels_checked_on_the_device_give_the_same_numbers_and_flag_only_real_labels(text, shapes):
    from converter.layers.loss import check_deferred_labels, deferred_label_checks

    scores = np.random.default_rng(5).standard_normal(shapes[0]).astype(np.float32)
    ignores = "ignore_label" in text
    labels = np.array([0, 3, 255, 2, 1, 255] if ignores else [0, 3, 1, 2, 1, 3], np.float32)
    results = []
    for deferred in (False, True):
        layer = build(text, *shapes)
        with deferred_label_checks(deferred):
            (x, _), tops = run(layer, scores, labels)
            if tops[0].requires_grad:
                tops[0].backward()
        results.append(([t.detach() for t in tops], x.grad))
        check_deferred_labels([layer])  # in range (or ignored): no error
    (tops, grad), (tops_late, grad_late) = results
    assert all(torch.equal(a, b) for a, b in zip(tops, tops_late, strict=True))
    assert (grad is None and grad_late is None) or torch.equal(grad, grad_late)
    for bad in (4, -1):
        layer = build(text, *shapes)
        with deferred_label_checks():
            run(layer, scores, np.where(labels == 1, bad, labels))
        with pytest.raises(CaffeError, match=r"layer 'l' .*: a label outside \[0, 4\) reached this layer"):
            check_deferred_labels([layer])
