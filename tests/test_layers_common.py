"""Common layers: BVLC Caffe's golden outputs, plus hand/numpy checks of what the golden cases leave out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from tests.golden import check_layers_of_case

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def build(text: str, *shapes: tuple[int, ...], tops: int = 1, phase: int = TRAIN):
    """A layer from prototxt text with bottoms ``b0, b1, ...`` of ``shapes`` and ``tops`` tops."""
    from converter.layers import layer_class

    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    lp.name = lp.name or "l"
    lp.bottom.extend(f"b{i}" for i in range(len(shapes)))
    lp.top.extend(f"t{i}" for i in range(tops))
    return layer_class(lp)(lp, list(shapes), phase)


def tensors(*arrays: np.ndarray, grad: bool = True) -> list[torch.Tensor]:
    return [torch.tensor(np.asarray(a, dtype=np.float32), requires_grad=grad) for a in arrays]


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- golden cases -----------------------------------------------------------------------------------
def test_golden_inner_product():
    assert check_layers_of_case("ip") == ["ip_ax1", "ip_ax2", "ip_tr"]


def test_golden_shape():
    types = {"Concat", "Slice", "Eltwise", "Flatten", "Reshape", "Softmax", "Silence"}
    checked = check_layers_of_case("shape", only_types=types)
    assert len(checked) == 11 and "eltwise_max" in checked and "silence" in checked


def test_golden_argmax_forward_only():
    assert check_layers_of_case("shape", "net_fwd.prototxt", phase=TEST, backward=False) == [
        "argmax", "argmax_ax1"]


def test_golden_batchnorm_train():
    assert check_layers_of_case("bn", phase=TRAIN) == ["bn_train", "scale_train", "bias"]


def test_golden_batchnorm_test():
    assert check_layers_of_case("bn", "net_test.prototxt", phase=TEST) == ["bn_global", "scale_global"]


# --- InnerProduct / Softmax -------------------------------------------------------------------------
def test_inner_product_transpose_shapes_and_values(rng):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(12, 5)), rng.normal(size=5)
    layer = build("type: 'InnerProduct' inner_product_param { num_output: 5 transpose: true }", (2, 3, 4))
    assert [s.shape for s in layer.blob_specs()] == [(12, 5), (5,)]
    (y,) = layer(tensors(x), tensors(w, b))
    np.testing.assert_allclose(np_(y), x.reshape(2, 12) @ w + b, rtol=1e-5, atol=1e-5)
    layer = build("type: 'InnerProduct' inner_product_param { num_output: 5 bias_term: false axis: -1 }",
                  (2, 3, 4))
    assert layer.top_shapes == [(2, 3, 5)] and [s.shape for s in layer.blob_specs()] == [(5, 4)]


def test_softmax_negative_axis(rng):
    x = rng.normal(size=(2, 3, 4)) * 50
    (y,) = build("type: 'Softmax' softmax_param { axis: -1 }", (2, 3, 4))(tensors(x), [])
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(np_(y), e / e.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-7)


# --- Reshape / Flatten --------------------------------------------------------------------------------
@pytest.mark.parametrize(("param", "shape", "expected"), [
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 2 dim: 4 } axis: 1 num_axes: 1", (2, 8), (2, 2, 4)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (2, 8), (1, 2, 8)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 8), (2, 8, 1)),
    ("shape { dim: -1 } axis: 1", (2, 3, 4), (2, 12)),
    ("shape { dim: 0 dim: -1 } axis: 1", (2, 3, 4), (2, 3, 4)),
    ("shape { dim: -1 } axis: -3 num_axes: 2", (2, 3, 4, 5), (2, 3, 20)),
    ("shape { dim: 0 dim: -1 } axis: -4 num_axes: 2", (2, 3, 4, 5), (2, 3, 4, 5)),
    ("shape { dim: 6 dim: -1 } axis: 1 num_axes: 2", (2, 3, 4, 5), (2, 6, 2, 5)),
])
def test_reshape_rules(rng, param, shape, expected):
    layer = build(f"type: 'Reshape' reshape_param {{ {param} }}", shape)
    assert layer.top_shapes == [expected]
    x = rng.normal(size=shape)
    (y,) = layer(tensors(x), [])
    np.testing.assert_array_equal(np_(y), x.astype(np.float32).reshape(expected))


@pytest.mark.parametrize(("param", "shape", "message"), [
    ("shape { dim: -1 dim: -1 }", (2, 8), "multiple -1"),
    ("shape { dim: 3 dim: -1 }", (2, 8), "must be divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 }", (2, 8), "no corresponding bottom axis"),
    ("shape { dim: 3 dim: 5 }", (2, 8), "output count must match"),
    ("shape { dim: 2 } axis: 1 num_axes: 2", (2, 8), "out of range"),
])
def test_reshape_errors(param, shape, message):
    with pytest.raises(CaffeError, match=message):
        build(f"type: 'Reshape' reshape_param {{ {param} }}", shape)


def test_reshape_and_flatten_refuse_in_place():
    from converter.layers import layer_class

    for text in ("type: 'Reshape' reshape_param { shape { dim: -1 } }", "type: 'Flatten'"):
        lp = text_format.Merge(text + " name: 'r' bottom: 'x' top: 'x'", caffe_pb2.LayerParameter())
        with pytest.raises(CaffeError, match="in-place"):
            layer_class(lp)(lp, [(2, 3)], TRAIN)


def test_flatten_axis_end_axis():
    assert build("type: 'Flatten' flatten_param { axis: 1 end_axis: 2 }", (2, 3, 4, 5)).top_shapes == [
        (2, 12, 5)]
    assert build("type: 'Flatten' flatten_param { axis: -2 }", (2, 3, 4, 5)).top_shapes == [(2, 3, 20)]
    with pytest.raises(CaffeError, match="axis 1 out of range"):
        build("type: 'Flatten'", (6,))
    assert build("type: 'Flatten' flatten_param { axis: 0 }", (2, 3)).top_shapes == [(6,)]


# --- Concat / Slice / Split -------------------------------------------------------------------------
def test_concat_concat_dim_alias_and_values(rng):
    a, b = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 4))
    layer = build("type: 'Concat' concat_param { concat_dim: 2 }", (2, 3, 2), (2, 3, 4))
    assert layer.top_shapes == [(2, 3, 6)]
    (y,) = layer(tensors(a, b), [])
    np.testing.assert_array_equal(np_(y), np.concatenate([a, b], axis=2).astype(np.float32))


def test_concat_shape_mismatch_names_shapes():
    with pytest.raises(CaffeError, match=r"'l' \(Concat\).*bottom 1 has shape 2x4x5, bottom 0 has 2x3x4"):
        build("type: 'Concat' concat_param { axis: 1 }", (2, 3, 4), (2, 4, 5))
    with pytest.raises(CaffeError, match="same number of axes"):
        build("type: 'Concat'", (2, 3, 4), (2, 3))
    with pytest.raises(CaffeError, match="not both"):
        build("type: 'Concat' concat_param { axis: 1 concat_dim: 1 }", (2, 3), (2, 3))


def test_slice_even_split_values_and_gradient(rng):
    x = rng.normal(size=(2, 6, 1))
    layer = build("type: 'Slice' slice_param { slice_dim: 1 }", (2, 6, 1), tops=3)
    assert layer.top_shapes == [(2, 2, 1)] * 3
    (xt,) = tensors(x)
    tops = layer([xt], [])
    for k, t in enumerate(tops):
        np.testing.assert_array_equal(np_(t), x[:, 2 * k: 2 * k + 2].astype(np.float32))
    torch.autograd.backward(tops, [torch.full_like(t, float(k + 1)) for k, t in enumerate(tops)])
    np.testing.assert_array_equal(xt.grad.numpy()[0, :, 0], [1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize(("param", "tops", "message"), [
    ("slice_point: 3 slice_point: 2", 3, "strictly increasing"),
    ("slice_point: 0", 2, "strictly increasing"),
    ("slice_point: 2", 3, "needs #tops - 1 = 2 entries, got 1"),
    ("slice_point: 2 slice_point: 7", 3, "beyond axis 1 of size 6"),
    ("", 4, r"number of top blobs \(4\) should evenly divide input slice axis \(6\)"),
    ("axis: 1 slice_dim: 1", 2, "not both"),
])
def test_slice_bad_points(param, tops, message):
    with pytest.raises(CaffeError, match=message):
        build(f"type: 'Slice' slice_param {{ {param} }}", (2, 6), tops=tops)


def test_split_sums_gradients(rng):
    (xt,) = tensors(rng.normal(size=(2, 3)))
    tops = build("type: 'Split'", (2, 3), tops=3)([xt], [])
    assert len(tops) == 3
    torch.autograd.backward(tops, [torch.full_like(t, 1.5) for t in tops])
    np.testing.assert_array_equal(xt.grad.numpy(), np.full((2, 3), 4.5, np.float32))


# --- Eltwise ----------------------------------------------------------------------------------------
def test_eltwise_max_tie_rule_three_bottoms():
    a = np.array([1.0, 2.0, 3.0, 0.0])
    b = np.array([1.0, 1.0, 3.0, 5.0])  # ties with a at 0 and 2 go to b (bottom 1)
    c = np.array([1.0, 2.0, 4.0, 5.0])  # equal to the running max at 0, 1, 3: not strictly greater, no win
    ts = tensors(a, b, c)
    (y,) = build("type: 'Eltwise' eltwise_param { operation: MAX }", (4,), (4,), (4,))(ts, [])
    np.testing.assert_array_equal(np_(y), [1, 2, 4, 5])
    y.backward(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    np.testing.assert_array_equal(ts[0].grad.numpy(), [0, 20, 0, 0])
    np.testing.assert_array_equal(ts[1].grad.numpy(), [10, 0, 0, 40])
    np.testing.assert_array_equal(ts[2].grad.numpy(), [0, 0, 30, 0])


def test_eltwise_prod_unstable_grad():
    a, b = np.array([2.0, 0.0, -1.0]), np.array([3.0, 4.0, 0.5])
    ts = tensors(a, b)
    (y,) = build("type: 'Eltwise' eltwise_param { operation: PROD stable_prod_grad: false }", (3,), (3,))(
        ts, [])
    y.backward(torch.ones(3))
    # Caffe's unstable gradient is top / bottom: 0/0 = nan where that bottom is 0
    np.testing.assert_allclose(ts[0].grad.numpy(), [3, np.nan, 0.5])
    np.testing.assert_allclose(ts[1].grad.numpy(), [2, 0, -1])


def test_eltwise_coeff_errors():
    with pytest.raises(CaffeError, match="one coefficient per bottom"):
        build("type: 'Eltwise' eltwise_param { coeff: 1 }", (2,), (2,))
    with pytest.raises(CaffeError, match="only takes coefficients for summation"):
        build("type: 'Eltwise' eltwise_param { operation: PROD coeff: 1 coeff: 2 }", (2,), (2,))
    with pytest.raises(CaffeError, match="same shape"):
        build("type: 'Eltwise'", (2, 3), (3, 2))


# --- Crop / Tile ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("param", "ref", "index"), [
    ("axis: 2 offset: 1 offset: 2", (9, 9, 2, 3), np.s_[:, :, 1:3, 2:5]),
    ("axis: 1 offset: 1", (9, 2, 2, 3), np.s_[:, 1:3, 1:3, 1:4]),
    ("", (9, 9, 3, 4), np.s_[:, :, 0:3, 0:4]),
    ("axis: -1 offset: 3", (1, 1, 1, 4), np.s_[:, :, :, 3:7]),
])
def test_crop_offsets(rng, param, ref, index):
    x = rng.normal(size=(2, 3, 6, 7))
    layer = build(f"type: 'Crop' crop_param {{ {param} }}", (2, 3, 6, 7), ref)
    xt, rt = tensors(x, np.zeros(ref))
    (y,) = layer([xt, rt], [])
    expected = x[index].astype(np.float32)
    np.testing.assert_array_equal(np_(y), expected)
    y.backward(torch.ones_like(y))
    mask = np.zeros(x.shape, np.float32)
    mask[index] = 1
    np.testing.assert_array_equal(xt.grad.numpy(), mask)
    assert rt.grad is None


def test_crop_errors():
    with pytest.raises(CaffeError, match="crop for dimension 3 is out-of-bounds with size 3 and offset 5"):
        build("type: 'Crop' crop_param { offset: 0 offset: 5 }", (2, 3, 6, 7), (2, 3, 2, 3))
    with pytest.raises(CaffeError, match="number of offset values"):
        build("type: 'Crop' crop_param { offset: 0 offset: 1 offset: 2 }", (2, 3, 6, 7), (2, 3, 2, 3))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_tile(rng, axis):
    x = rng.normal(size=(2, 3, 4))
    layer = build(f"type: 'Tile' tile_param {{ axis: {axis} tiles: 3 }}", (2, 3, 4))
    (xt,) = tensors(x)
    (y,) = layer([xt], [])
    np.testing.assert_array_equal(np_(y), np.concatenate([x] * 3, axis=axis).astype(np.float32))
    dy = rng.normal(size=y.shape)
    y.backward(torch.tensor(dy, dtype=torch.float32))
    expected = sum(np.split(dy, 3, axis=axis))
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_tile_needs_tiles():
    with pytest.raises(CaffeError, match="Number of tiles must be specified"):
        build("type: 'Tile'", (2, 3))


# --- Reduction --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("op", "fwd", "bwd"), [
    ("SUM", lambda x: x.sum(-1), lambda x: np.ones_like(x)),
    ("ASUM", lambda x: np.abs(x).sum(-1), lambda x: np.sign(x)),
    ("SUMSQ", lambda x: (x * x).sum(-1), lambda x: 2 * x),
    ("MEAN", lambda x: x.mean(-1), lambda x: np.full_like(x, 1 / x.shape[-1])),
])
def test_reduction_modes(rng, op, fwd, bwd):
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0, 0] = 0.0  # ASUM: sign(0) = 0 in Caffe
    layer = build(f"type: 'Reduction' reduction_param {{ operation: {op} axis: 2 coeff: -2.5 }}",
                  x.shape)
    assert layer.top_shapes == [(2, 3)]
    (xt,) = tensors(x)
    (y,) = layer([xt], [])
    flat = x.reshape(2, 3, 20).astype(np.float64)
    np.testing.assert_allclose(np_(y), -2.5 * fwd(flat), rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=(2, 3))
    y.backward(torch.tensor(dy, dtype=torch.float32))
    expected = (-2.5 * dy[:, :, None] * bwd(flat)).reshape(x.shape)
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_reduction_default_axis_is_scalar(rng):
    x = rng.normal(size=(3, 4))
    layer = build("type: 'Reduction'", (3, 4))
    assert layer.top_shapes == [()]
    (y,) = layer(tensors(x), [])
    assert y.shape == () and np.isclose(y.item(), x.sum(), rtol=1e-5)


# --- Embed ------------------------------------------------------------------------------------------
def test_embed(rng):
    idx = np.array([[0.0, 4.0, 2.0], [4.0, 4.0, 1.0]])
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    layer = build("type: 'Embed' embed_param { num_output: 3 input_dim: 5 }", (2, 3))
    assert layer.top_shapes == [(2, 3, 3)] and [s.shape for s in layer.blob_specs()] == [(5, 3), (3,)]
    (xt,) = tensors(idx)
    wt, bt = tensors(w, b)
    (y,) = layer([xt], [wt, bt])
    np.testing.assert_allclose(np_(y), w[idx.astype(int)] + b, rtol=1e-6)
    dy = rng.normal(size=(2, 3, 3))
    y.backward(torch.tensor(dy, dtype=torch.float32))
    dw = np.zeros((5, 3))
    np.add.at(dw, idx.astype(int).ravel(), dy.reshape(6, 3))
    np.testing.assert_allclose(wt.grad.numpy(), dw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bt.grad.numpy(), dy.reshape(6, 3).sum(0), rtol=1e-5, atol=1e-6)
    assert xt.grad is None  # Caffe cannot back-propagate into the indices
    assert [s.shape for s in build("type: 'Embed' embed_param { num_output: 3 input_dim: 5 bias_term: false }",
                                   (2,)).blob_specs()] == [(5, 3)]
    with pytest.raises(CaffeError, match="input_dim must be positive"):
        build("type: 'Embed' embed_param { num_output: 3 }", (2,))


# --- ArgMax -----------------------------------------------------------------------------------------
def test_argmax_ties_prefer_larger_index_and_padded_shape():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]).reshape(2, 2, 2, 1)
    layer = build("type: 'ArgMax' argmax_param { top_k: 3 out_max_val: true }", (2, 2, 2, 1))
    assert layer.top_shapes == [(2, 2, 3, 1)]
    (y,) = layer(tensors(x, grad=False), [])
    np.testing.assert_array_equal(np_(y)[..., 0], [[[2, 1, 0], [3, 3, 1]], [[3, 2, 1], [2, 2, 2]]])
    layer = build("type: 'ArgMax' argmax_param { axis: 1 }", (2, 4))
    (y,) = layer(tensors(x.reshape(2, 4), grad=False), [])
    np.testing.assert_array_equal(np_(y), [[2], [3]])
    with pytest.raises(CaffeError, match="top_k"):
        build("type: 'ArgMax' argmax_param { top_k: 5 }", (2, 2, 2))


# --- Scale / Bias -----------------------------------------------------------------------------------
def test_scale_with_two_bottoms(rng):
    x, s, b = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    layer = build("type: 'Scale' scale_param { bias_term: true bias_filler { type: 'constant' value: 7 } }",
                  (2, 3, 4, 5), (3, 4))
    specs = layer.blob_specs()
    assert [sp.shape for sp in specs] == [(3, 4)] and specs[0].filler.value == 7
    xt, st, bt = tensors(x, s, b)
    (y,) = layer([xt, st], [bt])
    np.testing.assert_allclose(np_(y), x * s[None, :, :, None] + b[None, :, :, None], rtol=1e-5, atol=1e-6)
    dy = rng.normal(size=x.shape)
    y.backward(torch.tensor(dy, dtype=torch.float32))
    np.testing.assert_allclose(xt.grad.numpy(), dy * s[None, :, :, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.grad.numpy(), (dy * x).sum(axis=(0, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bt.grad.numpy(), dy.sum(axis=(0, 3)), rtol=1e-5, atol=1e-5)


def test_scale_scalar_second_bottom_and_mismatch(rng):
    x = rng.normal(size=(2, 3))
    layer = build("type: 'Scale' scale_param { axis: 5 }", (2, 3), ())  # scalar: axis ignored (= 0)
    (y,) = layer(tensors(x, np.float32(1.5)), [])
    np.testing.assert_allclose(np_(y), 1.5 * x, rtol=1e-6)
    with pytest.raises(CaffeError, match=r"dimension mismatch between bottom\[0\]->shape\(1\) = 3"):
        build("type: 'Scale'", (2, 3), (4,))


def test_scale_learned_default_filler_and_num_axes():
    specs = build("type: 'Scale' scale_param { num_axes: -1 bias_term: true }", (2, 3, 4)).blob_specs()
    assert [s.shape for s in specs] == [(3, 4), (3, 4)]
    assert (specs[0].filler.type, specs[0].filler.value) == ("constant", 1.0)
    assert (specs[1].filler.type, specs[1].filler.value) == ("constant", 0.0)
    specs = build("type: 'Scale' scale_param { num_axes: 0 filler { type: 'uniform' } }", (2, 3)).blob_specs()
    assert specs[0].shape == () and specs[0].filler.type == "uniform"


def test_bias_second_bottom(rng):
    x, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3))
    layer = build("type: 'Bias' bias_param { axis: 0 }", (2, 3, 4), (2, 3))
    assert layer.blob_specs() == []
    xt, bt = tensors(x, b)
    (y,) = layer([xt, bt], [])
    np.testing.assert_allclose(np_(y), x + b[:, :, None], rtol=1e-6)
    y.backward(torch.ones_like(y))
    np.testing.assert_array_equal(bt.grad.numpy(), np.full((2, 3), 4, np.float32))


# --- BatchNorm --------------------------------------------------------------------------------------
def test_batchnorm_moving_average_update(rng):
    x = rng.normal(size=(4, 3, 2, 3)) * 2 + 1
    mean0, var0, factor0 = rng.normal(size=3), rng.uniform(1, 2, size=3), np.array([2.0])
    layer = build("type: 'BatchNorm' batch_norm_param { moving_average_fraction: 0.9 eps: 1e-3 }",
                  x.shape, phase=TRAIN)
    assert [s.shape for s in layer.blob_specs()] == [(3,), (3,), (1,)]
    assert all(s.filler.type == "constant" and s.filler.value == 0 for s in layer.blob_specs())
    xt, *blobs = tensors(x, mean0, var0, factor0)
    (y,) = layer([xt], blobs)
    bm, bv = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    m = 4 * 2 * 3
    np.testing.assert_allclose(blobs[2].detach().numpy(), [2.0 * 0.9 + 1], rtol=1e-6)
    np.testing.assert_allclose(blobs[0].detach().numpy(), 0.9 * mean0 + bm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blobs[1].detach().numpy(), 0.9 * var0 + m / (m - 1) * bv, rtol=1e-5)
    c = lambda v: v[None, :, None, None]  # noqa: E731
    np.testing.assert_allclose(np_(y), (x - c(bm)) / np.sqrt(c(bv) + 1e-3), rtol=1e-4, atol=1e-5)


def test_batchnorm_global_stats_default_in_test_and_zero_factor(rng):
    x = rng.normal(size=(2, 3, 4))
    mean0, var0 = rng.normal(size=3), rng.uniform(1, 2, size=3)
    layer = build("type: 'BatchNorm'", x.shape, phase=TEST)
    xt, *blobs = tensors(x, mean0, var0, [4.0])
    (y,) = layer([xt], blobs)
    c = lambda v: v[None, :, None]  # noqa: E731
    np.testing.assert_allclose(np_(y), (x - c(mean0 / 4)) / np.sqrt(c(var0 / 4) + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(blobs[0].detach().numpy(), mean0.astype(np.float32))  # untouched
    y.backward(torch.ones_like(y))
    np.testing.assert_allclose(xt.grad.numpy(), np.broadcast_to(1 / np.sqrt(c(var0 / 4) + 1e-5), x.shape),
                               rtol=1e-5)
    assert all(b.grad is None for b in blobs)  # Caffe computes no gradient for the statistics
    # factor 0: Caffe scales the stored statistics by 0, so y = x / sqrt(eps)
    xt, *blobs = tensors(x, mean0, var0, [0.0])
    (y,) = layer([xt], blobs)
    np.testing.assert_allclose(np_(y), x / np.sqrt(1e-5), rtol=1e-5)


def test_batchnorm_use_global_stats_override_and_lr_mult():
    layer = build("type: 'BatchNorm' batch_norm_param { use_global_stats: true }", (2, 3), phase=TRAIN)
    assert layer.use_global_stats
    assert not build("type: 'BatchNorm'", (2, 3), phase=TRAIN).use_global_stats
    build("type: 'BatchNorm' param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }", (2, 3))
    with pytest.raises(CaffeError, match="Cannot configure batch normalization statistics"):
        build("type: 'BatchNorm' param { lr_mult: 0 } param { lr_mult: 1 }", (2, 3))
