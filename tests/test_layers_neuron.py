"""Neuron layers: BVLC Caffe's golden outputs, plus hand/numpy checks of what the golden case leaves out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from tests.golden import check_layers_of_case

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def build(text: str, shape: tuple[int, ...] = (2, 3, 4, 5), phase: int = TEST, in_place: bool = False):
    from converter.layers import layer_class

    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    lp.name = lp.name or "l"
    lp.bottom.append("x")
    lp.top.append("x" if in_place else "y")
    return layer_class(lp)(lp, [shape], phase)


def run(layer, x: np.ndarray, dy: np.ndarray | None = None, blobs: list[np.ndarray] | None = None):
    """Forward (and backward with top diff ``dy``): returns y, dx and the blob gradients as numpy."""
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    bt = [torch.tensor(b, dtype=torch.float32, requires_grad=True) for b in blobs or []]
    (y,) = layer([xt], bt)
    if dy is None:
        return y.detach().numpy()
    y.backward(torch.tensor(dy, dtype=torch.float32))
    return y.detach().numpy(), xt.grad.numpy(), [b.grad.numpy() for b in bt]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def with_zeros(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a.ravel()[::7] = 0.0
    return a


# -- BVLC Caffe's own outputs ---------------------------------------------------------------------

def test_golden_neurons_forward_backward():
    checked = check_layers_of_case("neurons", phase=TEST)
    assert len(checked) == 15


def test_golden_threshold_forward():
    assert check_layers_of_case("neurons", "net_fwd.prototxt", phase=TEST, backward=False) == ["threshold"]


# -- derivatives at exactly 0 and shapes ------------------------------------------------------------

def test_relu_slope_and_derivative_at_zero():
    x = np.array([-2.0, -0.0, 0.0, 3.0], np.float32)
    y, dx, _ = run(build('type: "ReLU" relu_param { negative_slope: 0.25 }', (4,)), x, np.ones(4, np.float32))
    np.testing.assert_array_equal(y, [-0.5, 0, 0, 3])
    np.testing.assert_array_equal(dx, [0.25, 0.25, 0.25, 1])
    _, dx, _ = run(build('type: "ReLU"', (4,)), x, np.ones(4, np.float32))
    np.testing.assert_array_equal(dx, [0, 0, 0, 1])


def test_absval_sign_zero_and_in_place_refused():
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    y, dx, _ = run(build('type: "AbsVal"', (3,)), x, np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(y, [2, 0, 3])
    np.testing.assert_array_equal(dx, [-2, 0, 2])
    with pytest.raises(CaffeError, match="in-place"):
        build('type: "AbsVal"', (3,), in_place=True)


def test_elu_alpha_and_derivative_at_zero(rng):
    x = with_zeros(rng.normal(size=(3, 5)) * 2)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "ELU" elu_param { alpha: 0.5 }', x.shape), x, dy)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, np.where(x64 > 0, x64, 0.5 * np.expm1(x64)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, dy * np.where(x64 > 0, 1.0, 0.5 * np.exp(x64)), rtol=1e-6, atol=1e-7)
    assert np.all(dx[x == 0] == (0.5 * dy[x == 0]))


def test_shapes_are_kept():
    for text in ('type: "TanH"', 'type: "Sigmoid"', 'type: "BNLL"', 'type: "Dropout"',
                 'type: "Threshold"', 'type: "Power"', 'type: "Exp"', 'type: "Log"',
                 'type: "Swish"', 'type: "Clip" clip_param { min: 0 max: 1 }'):
        assert build(text, (2, 7)).top_shapes == [(2, 7)]


# -- PReLU --------------------------------------------------------------------------------------------

def test_prelu_default_filler_and_blob_shapes():
    layer = build('type: "PReLU"')
    (spec,) = layer.blob_specs()
    assert spec.shape == (3,) and spec.filler.type == "constant" and spec.filler.value == 0.25
    shared = build('type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: 0.1 } }')
    (spec,) = shared.blob_specs()
    assert spec.shape == () and spec.filler.value == pytest.approx(0.1)
    with pytest.raises(CaffeError, match="axes"):
        build('type: "PReLU"', (5,))


def test_prelu_per_channel_gradients(rng):
    x = with_zeros(rng.normal(size=(2, 3, 2, 2)))
    dy = rng.normal(size=x.shape).astype(np.float32)
    slopes = np.array([0.1, -0.2, 0.7], np.float32)
    y, dx, (dslope,) = run(build('type: "PReLU"', x.shape), x, dy, [slopes])
    s = slopes[None, :, None, None]
    np.testing.assert_allclose(y, np.where(x > 0, x, s * x), rtol=1e-6)
    np.testing.assert_allclose(dx, dy * np.where(x > 0, 1, s), rtol=1e-6)
    np.testing.assert_allclose(dslope, (dy * x * (x <= 0)).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_prelu_channel_shared_sums_over_all_channels(rng):
    x = with_zeros(rng.normal(size=(4, 3)))  # 2-D bottom: dim = 1
    dy = rng.normal(size=x.shape).astype(np.float32)
    slope = np.array(0.3, np.float32)
    layer = build('type: "PReLU" prelu_param { channel_shared: true }', x.shape)
    y, dx, (dslope,) = run(layer, x, dy, [slope])
    assert dslope.shape == ()
    np.testing.assert_allclose(y, np.where(x > 0, x, 0.3 * x), rtol=1e-6)
    np.testing.assert_allclose(dx, dy * np.where(x > 0, 1, np.float32(0.3)), rtol=1e-6)
    np.testing.assert_allclose(dslope, (dy * x * (x <= 0)).sum(), rtol=1e-5)


# -- Power, Exp, Log --------------------------------------------------------------------------------

def test_power_general_formula(rng):
    x = rng.uniform(0.1, 2.0, size=(2, 3, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "Power" power_param { power: 3 scale: 2 shift: 0.5 }', x.shape), x, dy)
    base = 0.5 + 2.0 * x.astype(np.float64)
    np.testing.assert_allclose(y, base**3, rtol=2e-6)
    np.testing.assert_allclose(dx, dy * 3 * 2 * base**2, rtol=1e-5)


def test_power_fractional_power_no_shift_and_nan_at_zero():
    # shift 0: Caffe's backward is power * y / x, which is 0/0 = NaN at x = 0 (the exact gradient is 0).
    x = np.array([0.0, 0.25, 4.0], np.float32)
    y, dx, _ = run(build('type: "Power" power_param { power: 1.5 scale: 1 }', (3,)), x, np.ones(3, np.float32))
    np.testing.assert_allclose(y, [0, 0.125, 8], rtol=1e-6)
    assert np.isnan(dx[0])
    np.testing.assert_allclose(dx[1:], 1.5 * np.sqrt(x[1:]), rtol=1e-6)


def test_power_special_cases():
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    dy = np.array([1.0, 2.0, 3.0], np.float32)
    y, dx, _ = run(build('type: "Power" power_param { scale: -3 shift: 1 }', (3,)), x, dy)  # power 1
    np.testing.assert_array_equal(y, [4, 1, -5])
    np.testing.assert_array_equal(dx, [-3, -6, -9])
    y, dx, _ = run(build('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', (3,)), x, dy)
    np.testing.assert_array_equal(y, [9, 9, 9])
    np.testing.assert_array_equal(dx, [0, 0, 0])
    y, dx, _ = run(build('type: "Power" power_param { power: 0 shift: 0 }', (3,)), x, dy)
    np.testing.assert_array_equal(y, [1, 1, 1])
    np.testing.assert_array_equal(dx, [0, 0, 0])
    y, dx, _ = run(build('type: "Power"', (3,)), x, dy)  # identity
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


def test_power_without_grad_matches():
    layer = build('type: "Power" power_param { power: 2.5 scale: 0.5 shift: 1 }', (5,))
    x = torch.linspace(0, 3, 5)
    with torch.no_grad():
        (a,) = layer([x], [])
    (b,) = layer([x.clone().requires_grad_()], [])
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_exp_base_scale_shift(rng):
    x = rng.uniform(-2, 2, size=(3, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "Exp" exp_param { base: 3 scale: 0.7 shift: -0.4 }', x.shape), x, dy)
    want = 3.0 ** (-0.4 + 0.7 * x.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=2e-6)
    np.testing.assert_allclose(dx, dy * want * np.log(3.0) * 0.7, rtol=1e-5)
    # base e with a shift: outer scale exp(shift)
    y = run(build('type: "Exp" exp_param { shift: 0.5 scale: -1 }', x.shape), x)
    np.testing.assert_allclose(y, np.exp(0.5 - x.astype(np.float64)), rtol=2e-6)


def test_log_base_scale_shift(rng):
    x = rng.uniform(0, 3, size=(3, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "Log" log_param { base: 10 scale: 2 shift: 3 }', x.shape), x, dy)
    z = 3 + 2 * x.astype(np.float64)
    np.testing.assert_allclose(y, np.log10(z), rtol=2e-6)
    np.testing.assert_allclose(dx, dy * 2 / (np.log(10.0) * z), rtol=1e-5)


@pytest.mark.parametrize("text", ['type: "Exp" exp_param { base: -2 }', 'type: "Log" log_param { base: 0 }',
                                  'type: "Log" log_param { base: 1 }'])
def test_exp_log_bad_base(text):
    with pytest.raises(CaffeError, match="base"):
        build(text)


# -- Sigmoid, BNLL, Threshold, Clip, Swish -----------------------------------------------------------

def test_sigmoid_is_correctly_rounded(rng):
    x = with_zeros(rng.normal(size=(50,)) * 5)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "Sigmoid"', x.shape), x, dy)
    want = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_allclose(dx, dy * want * (1 - want), rtol=1e-5, atol=1e-7)


def test_bnll_forward_and_thresholded_backward():
    x = np.array([-100.0, -3.0, 0.0, 2.0, 49.0, 60.0, 100.0], np.float32)
    dy = np.full(x.shape, 2.0, np.float32)
    y, dx, _ = run(build('type: "BNLL"', x.shape), x, dy)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, np.logaddexp(0, x64), rtol=1e-6, atol=1e-30)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, 2 / (1 + np.exp(-x64)), rtol=1e-6, atol=1e-30)
    assert dx[2] == 1.0  # dy * sigmoid(0)


def test_threshold_strict_and_no_gradient():
    layer = build('type: "Threshold" threshold_param { threshold: 0.5 }', (4,))
    x = torch.tensor([0.0, 0.5, 0.50001, 2.0], requires_grad=True)
    (y,) = layer([x], [])
    np.testing.assert_array_equal(y.numpy(), [0, 0, 1, 1])
    assert not y.requires_grad


def test_clip_bounds_and_gradient():
    x = np.array([-2.0, -1.0, 0.5, 1.0, 3.0], np.float32)
    y, dx, _ = run(build('type: "Clip" clip_param { min: -1 max: 1 }', x.shape), x, np.ones(5, np.float32))
    np.testing.assert_array_equal(y, [-1, -1, 0.5, 1, 1])
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0])
    y = run(build('type: "Clip" clip_param { min: 2 max: 1 }', x.shape), x)  # Caffe: max(min, min(x, max))
    np.testing.assert_array_equal(y, np.full(5, 2.0))


def test_swish_beta(rng):
    x = with_zeros(rng.normal(size=(20,)) * 3)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, _ = run(build('type: "Swish" swish_param { beta: 1.5 }', x.shape), x, dy)
    x64 = x.astype(np.float64)
    s = 1 / (1 + np.exp(-1.5 * x64))
    np.testing.assert_allclose(y, x64 * s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, dy * (s + 1.5 * x64 * s * (1 - s)), rtol=1e-5, atol=1e-6)


# -- Dropout ------------------------------------------------------------------------------------------

def test_dropout_train_scaling_and_mask_fraction():
    layer = build('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', (200, 500), TRAIN)
    torch.manual_seed(0)
    y = run(layer, np.ones((200, 500), np.float32))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.005
    np.testing.assert_array_equal(y[kept], np.float32(1 / (1 - np.float32(0.3))))


def test_dropout_seeded_reproducible_and_backward_is_mask_scaled(rng):
    layer = build('type: "Dropout" dropout_param { dropout_ratio: 0.6 }', (40, 50), TRAIN)
    x = rng.normal(size=(40, 50)).astype(np.float32) + 10  # never 0, so y != 0 marks the mask
    dy = rng.normal(size=x.shape).astype(np.float32)
    torch.manual_seed(1234)
    y1, dx1, _ = run(layer, x, dy)
    torch.manual_seed(1234)
    y2, _, _ = run(layer, x, dy)
    np.testing.assert_array_equal(y1, y2)
    torch.manual_seed(4321)
    assert not np.array_equal(run(layer, x), y1)
    mask = (y1 != 0).astype(np.float32)
    scale = np.float32(1 / (1 - np.float32(0.6)))
    np.testing.assert_array_equal(y1, x * mask * scale)
    np.testing.assert_array_equal(dx1, dy * mask * scale)


def test_dropout_test_phase_is_a_copy():
    layer = build('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', (3, 4), TEST)
    x = torch.randn(3, 4, requires_grad=True)
    (y,) = layer([x], [])
    assert y is not x
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    y.backward(torch.full((3, 4), 3.0))
    torch.testing.assert_close(x.grad, torch.full((3, 4), 3.0))


def test_dropout_scale_train_false_forks():
    # BVLC's schema has no scale_train; the fork semantics are reachable by setting the attribute.
    x = np.full((100, 100), 2.0, np.float32)
    test = build('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', x.shape, TEST)
    train = build('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', x.shape, TRAIN)
    assert test.scale_train and train.scale_train
    test.scale_train = train.scale_train = False
    np.testing.assert_array_equal(run(test, x), np.full(x.shape, 1.5, np.float32))
    assert set(np.unique(run(train, x))) == {0.0, 2.0}


def test_dropout_bad_ratio():
    with pytest.raises(CaffeError, match="dropout_ratio"):
        build('type: "Dropout" dropout_param { dropout_ratio: 1 }')
