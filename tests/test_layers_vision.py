"""Convolution, Deconvolution, Pooling and LRN against BVLC Caffe's outputs and hand-written references.

The golden cases replay Caffe's own blobs; the numpy references below transcribe Caffe's C++ loops
(``pooling_layer.cpp``, ``lrn_layer.cpp``'s WITHIN_CHANNEL sub-net) or the definition of the operation
(a scatter loop for deconvolution, a correlation loop for grouped convolution). None of them calls the
code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.layers import layer_class
from tests.golden import check_layers_of_case

FLT_MAX = float(np.finfo(np.float32).max)


def make(params: str, *shapes: tuple[int, ...], layer_type: str, tops: int = 1):
    """Build a layer named 'L' from the text of its ``*_param`` with one bottom per shape."""
    lp = caffe_pb2.LayerParameter(name="L", type=layer_type)
    text_format.Merge(params, lp)
    lp.bottom.extend(f"b{i}" for i in range(len(shapes)))
    lp.top.extend(f"t{i}" for i in range(tops))
    return layer_class(lp)(lp, list(shapes), caffe_pb2.TRAIN)


def run(layer, *arrays: np.ndarray, blobs=(), top_diff: np.ndarray | None = None):
    """Forward (and backward with ``top_diff`` on top 0); returns tops, bottom grads, blob grads."""
    bottoms = [torch.tensor(a, requires_grad=True) for a in arrays]
    params = [torch.tensor(b, requires_grad=True) for b in blobs]
    tops = layer(bottoms, params)
    if top_diff is None:
        return [t.detach().numpy() for t in tops], None, None
    tops[0].backward(torch.tensor(top_diff))
    grads = [b.grad.numpy() if b.grad is not None else np.zeros_like(a)
             for b, a in zip(bottoms, arrays, strict=True)]
    return [t.detach().numpy() for t in tops], grads, [p.grad.numpy() for p in params]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- golden cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, layers", [
    ("conv", ["conv_p1s2", "conv_rect", "conv_group", "conv_dil", "conv_nobias"]),
    ("pool", ["pool_max_13", "pool_ave_13", "pool_max_14", "pool_ave_14", "pool_max_32", "pool_ave_32",
              "pool_global_ave", "pool_max_pad", "pool_max_tie"]),
    ("lrn", ["lrn_k1", "lrn_k2"]),
])
def test_golden(case, layers):
    assert check_layers_of_case(case) == layers


# -- Pooling: Caffe's C++ loops transcribed -----------------------------------------------------

def caffe_pooled(size, k, s, p, any_pad, ceil=True):
    rounded = math.ceil(float(size + 2 * p - k) / s) if ceil else math.floor(float(size + 2 * p - k) / s)
    pooled = int(rounded) + 1
    if any_pad and (pooled - 1) * s >= size + p:
        pooled -= 1
    return pooled


def caffe_pool(x, method, k, s, p, top_diff=None, ceil=True):
    """PoolingLayer::Forward_cpu / Backward_cpu for MAX ('max') and AVE ('ave'), loop for loop."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n, c, h, w = x.shape
    oh = caffe_pooled(h, kh, sh, ph, ph or pw, ceil)
    ow = caffe_pooled(w, kw, sw, pw, ph or pw, ceil)
    top = np.zeros((n, c, oh, ow), np.float32)
    mask = np.full((n, c, oh, ow), -1.0, np.float32)
    dx = np.zeros_like(x)
    for i in range(n):
        for j in range(c):
            for y in range(oh):
                for z in range(ow):
                    hs, ws = y * sh - ph, z * sw - pw
                    if method == "max":
                        he, we = min(hs + kh, h), min(ws + kw, w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best = np.float32(-FLT_MAX)
                        for a in range(hs, he):
                            for b in range(ws, we):
                                if x[i, j, a, b] > best:
                                    best, mask[i, j, y, z] = x[i, j, a, b], a * w + b
                        top[i, j, y, z] = best
                        if top_diff is not None and mask[i, j, y, z] >= 0:
                            a, b = divmod(int(mask[i, j, y, z]), w)
                            dx[i, j, a, b] += top_diff[i, j, y, z]
                    else:
                        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                        pool_size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        total = np.float32(x[i, j, hs:he, ws:we].sum(dtype=np.float32))
                        with np.errstate(invalid="ignore", divide="ignore"):
                            top[i, j, y, z] = total / np.float32(pool_size)
                        if top_diff is not None and he > hs and we > ws:
                            dx[i, j, hs:he, ws:we] += top_diff[i, j, y, z] / np.float32(pool_size)
    return top, mask, dx


def pool_params(method, k, s, p, extra=""):
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    return (f"pooling_param {{ pool: {method.upper()} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} "
            f"stride_w: {sw} pad_h: {ph} pad_w: {pw} {extra} }}")


@pytest.mark.parametrize("size, k, s, p, expected", [
    (32, 1, 2, 0, 17),   # PyTorch's ceil_mode gives 16 (pytorch#57178): Caffe clips only with pad
    (13, 3, 2, 0, 6),
    (14, 3, 2, 0, 7),    # floor rule: 6
    (32, 3, 2, 0, 16),   # floor rule: 15
    (112, 3, 2, 0, 56),  # GoogLeNet pool1; floor rule: 55
    (227, 3, 2, 0, 113),
    (5, 2, 2, 1, 3),     # ceil gives 4, the last window would start at 6 >= 5 + 1: clipped
    (3, 3, 3, 2, 2),     # ceil gives 3, clipped
    (5, 3, 2, 1, 3),     # pad 1, no clip needed
])
def test_pool_output_size(size, k, s, p, expected):
    for method in ("MAX", "AVE"):
        layer = make(f"pooling_param {{ pool: {method} kernel_size: {k} stride: {s} pad: {p} }}",
                     (1, 2, size, size), layer_type="Pooling")
        assert layer.top_shapes == [(1, 2, expected, expected)]


def test_pool_clip_applies_to_both_axes_when_either_is_padded():
    # pad_h 0 but pad_w 1: Caffe's `if (pad_h_ || pad_w_)` clips the height too (3 -> 2).
    layer = make(pool_params("max", (1, 2), (2, 2), (0, 1)), (1, 1, 4, 4), layer_type="Pooling")
    assert layer.top_shapes == [(1, 1, 2, 3)]
    layer = make(pool_params("max", (1, 2), (2, 2), (0, 0)), (1, 1, 4, 4), layer_type="Pooling")
    assert layer.top_shapes == [(1, 1, 3, 2)]


def test_pool_round_mode_floor():
    layer = make("pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR }", (1, 1, 14, 14),
                 layer_type="Pooling")
    assert layer.top_shapes == [(1, 1, 6, 6)]


@pytest.mark.parametrize("method", ["max", "ave"])
@pytest.mark.parametrize("shape, k, s, p, ceil", [
    ((2, 2, 13, 13), (3, 3), (2, 2), (0, 0), True),   # torch's own windows
    ((2, 2, 14, 14), (3, 3), (2, 2), (0, 0), True),   # ceil overhang
    ((1, 2, 32, 32), (1, 1), (2, 2), (0, 0), True),   # a last row/column of empty windows
    ((1, 2, 9, 10), (3, 3), (2, 2), (1, 1), True),    # padding, native
    ((1, 2, 4, 4), (3, 3), (2, 2), (1, 1), True),     # padding and overhang
    ((1, 2, 5, 5), (2, 2), (2, 2), (1, 1), True),     # clipped
    ((1, 2, 7, 8), (3, 2), (2, 3), (2, 1), True),     # pad > kernel/2 (torch refuses it natively)
    ((1, 1, 4, 6), (1, 2), (2, 2), (0, 1), True),     # clip on the unpadded axis
    ((1, 2, 10, 10), (3, 3), (4, 4), (0, 0), False),  # FLOOR: the input is cropped
    ((1, 2, 14, 14), (3, 3), (2, 2), (1, 1), False),
])
def test_pool_matches_caffe_loops(method, shape, k, s, p, ceil):
    x = rng(1).standard_normal(shape).astype(np.float32)
    extra = "" if ceil else "round_mode: FLOOR"
    tops = 2 if method == "max" else 1
    layer = make(pool_params(method, k, s, p, extra), shape, layer_type="Pooling", tops=tops)
    top_ref, mask_ref, _ = caffe_pool(x, method, k, s, p, ceil=ceil)
    diff = rng(2).standard_normal(top_ref.shape).astype(np.float32)
    _, _, dx_ref = caffe_pool(x, method, k, s, p, diff, ceil=ceil)
    got, grads, _ = run(layer, x, top_diff=diff)
    assert layer.top_shapes[0] == top_ref.shape
    np.testing.assert_allclose(got[0], top_ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(grads[0], dx_ref, rtol=1e-6, atol=1e-7)
    if method == "max":
        np.testing.assert_array_equal(got[1], mask_ref)
        assert got[1].dtype == np.float32


def test_pool_empty_windows_are_caffes():
    # 32, k1 s2: the 17th window starts at 32 = H. MAX leaves -FLT_MAX (mask -1); AVE divides 0 by
    # pool_size 0 and gives NaN, as Caffe's CPU loop does.
    x = np.ones((1, 1, 32, 32), np.float32)
    mx = make("pooling_param { pool: MAX kernel_size: 1 stride: 2 }", x.shape, layer_type="Pooling", tops=2)
    (top, mask), _, _ = run(mx, x)
    assert top[0, 0, 16, 0] == -FLT_MAX and top[0, 0, 0, 16] == -FLT_MAX and top[0, 0, 15, 15] == 1
    assert mask[0, 0, 16, 3] == -1 and mask[0, 0, 1, 1] == 2 * 32 + 2
    ave = make("pooling_param { pool: AVE kernel_size: 1 stride: 2 }", x.shape, layer_type="Pooling")
    (top,), _, _ = run(ave, x)
    assert np.isnan(top[0, 0, 16, 0]) and np.isnan(top[0, 0, 3, 16]) and top[0, 0, 15, 15] == 1


def test_pool_max_values_not_above_minus_flt_max_never_win():
    # Caffe starts at -FLT_MAX and replaces on '>': windows of only -inf / -FLT_MAX give -FLT_MAX,
    # mask -1 and no gradient.
    x = np.array([[[[-np.inf, -FLT_MAX, -np.inf, -np.inf], [-np.inf, -np.inf, -np.inf, 2.0]]]], np.float32)
    layer = make("pooling_param { pool: MAX kernel_size: 2 stride: 2 }", x.shape, layer_type="Pooling", tops=2)
    (top, mask), grads, _ = run(layer, x, top_diff=np.ones((1, 1, 1, 2), np.float32))
    np.testing.assert_array_equal(top[0, 0], [[-FLT_MAX, 2]])
    np.testing.assert_array_equal(mask[0, 0], [[-1, 7]])
    np.testing.assert_array_equal(grads[0][0, 0], [[0, 0, 0, 0], [0, 0, 0, 1]])


def test_pool_ave_divisor_counts_padding_not_overhang():
    # 4x4 ones, k3 s2 p1 -> 3x3. Windows along an axis: [-1,2) [1,4) [3,6)->[3,5): divisors 3, 3, 2
    # (the row beyond H + pad = 5 is not counted), real elements 2, 3, 1.
    layer = make("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", (1, 1, 4, 4),
                 layer_type="Pooling")
    (top,), grads, _ = run(layer, np.ones((1, 1, 4, 4), np.float32), top_diff=np.ones((1, 1, 3, 3), np.float32))
    expected = np.array([[4 / 9, 6 / 9, 2 / 6], [6 / 9, 9 / 9, 3 / 6], [2 / 6, 3 / 6, 1 / 4]], np.float32)
    np.testing.assert_allclose(top[0, 0], expected, rtol=1e-6)
    # Backward: each element gets 1/divisor from every window that holds it.
    per_axis = np.array([1 / 3, 1 / 3 + 1 / 3, 1 / 3, 1 / 3 + 1 / 2])
    np.testing.assert_allclose(grads[0][0, 0], np.outer(per_axis, per_axis), rtol=1e-6)
    # 5x5, k3 s2 p1: every window ends at H + pad = 6, divisor 9 everywhere, padding counted.
    layer = make("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", (1, 1, 5, 5),
                 layer_type="Pooling")
    (top,), _, _ = run(layer, np.ones((1, 1, 5, 5), np.float32))
    real = np.array([2, 3, 2])
    np.testing.assert_allclose(top[0, 0], np.outer(real, real) / 9, rtol=1e-6)


def test_pool_max_tie_goes_to_first_in_scan_order():
    x = np.array([[[[1, 3, 3, 0], [3, 3, 0, 0], [2, 2, 5, 5], [2, 2, 5, 5]]]], np.float32)
    layer = make("pooling_param { pool: MAX kernel_size: 2 stride: 2 }", x.shape, layer_type="Pooling", tops=2)
    (top, mask), grads, _ = run(layer, x, top_diff=np.ones((1, 1, 2, 2), np.float32))
    np.testing.assert_array_equal(top[0, 0], [[3, 3], [2, 5]])
    np.testing.assert_array_equal(mask[0, 0], [[1, 2], [8, 10]])
    expected = np.zeros((4, 4), np.float32)
    expected[0, 1] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1
    np.testing.assert_array_equal(grads[0][0, 0], expected)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = rng(3).standard_normal((2, 3, 5, 7)).astype(np.float32)
    layer = make(f"pooling_param {{ pool: {method} global_pooling: true }}", x.shape, layer_type="Pooling")
    assert layer.top_shapes == [(2, 3, 1, 1)]
    diff = rng(4).standard_normal((2, 3, 1, 1)).astype(np.float32)
    (top,), grads, _ = run(layer, x, top_diff=diff)
    if method == "MAX":
        np.testing.assert_array_equal(top, x.max(axis=(2, 3), keepdims=True))
        flat = x.reshape(6, 35)
        expected = np.zeros_like(flat)
        expected[np.arange(6), flat.argmax(axis=1)] = diff.reshape(6)
        np.testing.assert_array_equal(grads[0], expected.reshape(x.shape))
    else:
        np.testing.assert_allclose(top, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads[0], np.broadcast_to(diff / 35, x.shape), rtol=1e-6)


@pytest.mark.parametrize("params, tops, message", [
    ("pool: MAX kernel_size: 3 pad: 3", 1, r"pad \(3x3\) must be smaller than the kernel \(3x3\)"),
    ("pool: AVE kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 3", 1, r"pad \(1x3\) must be smaller than the kernel"),
    ("pool: STOCHASTIC kernel_size: 2", 1, "STOCHASTIC pooling is not supported"),
    ("pool: AVE kernel_size: 2", 2, "only MAX pooling has a second top"),
    ("pool: MAX global_pooling: true kernel_size: 2", 1, "With Global_pooling: true Filter size cannot"),
    ("pool: AVE global_pooling: true pad: 1", 1, "only pad = 0 and stride = 1"),
    ("pool: MAX kernel_h: 2", 1, "both kernel_h and kernel_w"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, "not both"),
    ("pool: MAX kernel_size: 2 pad: 1 pad_h: 1", 1, "pad is pad OR pad_h and pad_w"),
    ("pool: MAX kernel_size: 2 stride_w: 1", 1, "Stride is stride OR stride_h and stride_w"),
    ("pool: MAX kernel_size: 9", 1, "not positive"),
])
def test_pool_errors(params, tops, message):
    with pytest.raises(CaffeError, match=message) as err:
        make(f"pooling_param {{ {params} }}", (1, 2, 6, 6), layer_type="Pooling", tops=tops)
    assert "layer 'L' (Pooling)" in str(err.value) and "1x2x6x6" in str(err.value)


def test_pool_needs_4_axes():
    with pytest.raises(CaffeError, match="Input must have 4 axes"):
        make("pooling_param { kernel_size: 2 }", (2, 6, 6), layer_type="Pooling")


# -- Convolution / Deconvolution ---------------------------------------------------------------

def correlate(x, weight, bias, stride, pad, dilation, group):
    """Grouped cross-correlation by its definition: zero-pad, then add each kernel tap's slice."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    o, cg, kh, kw = weight.shape
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), np.float64)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                           j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, weight[g * og:(g + 1) * og, :, i, j])
    return out + (0 if bias is None else bias.reshape(1, -1, 1, 1))


def deconvolve(x, weight, bias, stride, pad, dilation, group, top_diff):
    """Deconvolution as a scatter: input pixel (h, w) adds ``x * W[tap]`` at ``h*s - pad + tap*d``.

    Returns the top and, from the same scatter read backwards, the bottom and weight gradients.
    """
    n, c, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    _, og, kh, kw = weight.shape
    full_h, full_w = sh * (h - 1) + dh * (kh - 1) + 1, sw * (w - 1) + dw * (kw - 1) + 1
    oh, ow = full_h - 2 * ph, full_w - 2 * pw
    full = np.zeros((n, og * group, full_h, full_w))
    diff = np.zeros_like(full)
    diff[:, :, ph:ph + oh, pw:pw + ow] = top_diff
    dx, dweight = np.zeros(x.shape), np.zeros(weight.shape)
    cg = c // group
    for ci in range(c):
        g = ci // cg
        for co in range(og):
            for i in range(kh):
                for j in range(kw):
                    rows = slice(i * dh, i * dh + sh * (h - 1) + 1, sh)
                    cols = slice(j * dw, j * dw + sw * (w - 1) + 1, sw)
                    full[:, g * og + co, rows, cols] += x[:, ci] * weight[ci, co, i, j]
                    dx[:, ci] += diff[:, g * og + co, rows, cols] * weight[ci, co, i, j]
                    dweight[ci, co, i, j] += (diff[:, g * og + co, rows, cols] * x[:, ci]).sum()
    top = full[:, :, ph:ph + oh, pw:pw + ow] + bias.reshape(1, -1, 1, 1)
    return top, dx, dweight


def conv_params(num_output, extra):
    return f"convolution_param {{ num_output: {num_output} {extra} }}"


def test_group_convolution_against_loop():
    r = rng(5)
    x = r.standard_normal((2, 6, 7, 8)).astype(np.float32)
    layer = make(conv_params(4, "group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 1 "
                                "dilation: 2"), x.shape, layer_type="Convolution")
    specs = layer.blob_specs()
    assert [s.shape for s in specs] == [(4, 3, 3, 2), (4,)]
    weight = r.standard_normal(specs[0].shape).astype(np.float32)
    bias = r.standard_normal(4).astype(np.float32)
    expected = correlate(x, weight, bias, (2, 1), (2, 1), (2, 2), 2)
    assert layer.top_shapes == [expected.shape]
    (top,), _, _ = run(layer, x, blobs=[weight, bias])
    np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, params, live", [
    # the thesis's conv2: k5 p2 on a 2x2 map, only the central 3x3 taps ever meet the input
    ((3, 4, 2, 2), "kernel_size: 5 pad: 2 group: 2", (range(1, 4), range(1, 4))),
    # dilated, stride 2 on a 2x3 map: rows keep the middle tap only; every column tap meets the input
    ((2, 2, 2, 3), "kernel_size: 3 pad: 2 dilation: 2 stride: 2", (range(1, 2), range(0, 3))),
    # nothing dead: kept whole
    ((2, 2, 6, 6), "kernel_size: 3 pad: 1", None),
])
def test_convolution_cuts_taps_that_only_meet_padding(shape, params, live):
    """Forward, weight and input gradients against the zero-padded definition in float64; the taps that
    only ever meet padding get exactly zero weight gradient, as Caffe's im2col of zeros gives."""
    r = rng(9)
    x = r.standard_normal(shape).astype(np.float32)
    layer = make(conv_params(4, params), x.shape, layer_type="Convolution")
    assert (layer.live_taps[:2] if layer.live_taps else None) == live
    weight = r.standard_normal(layer.blob_specs()[0].shape).astype(np.float32)
    bias = r.standard_normal(4).astype(np.float32)
    stride, pad, dilation, group = layer.stride, layer.pad, layer.dilation, layer.group
    expected = correlate(x, weight, bias, stride, pad, dilation, group)
    top_diff = r.standard_normal(expected.shape).astype(np.float32)
    (top,), (x_grad,), (w_grad, b_grad) = run(layer, x, blobs=[weight, bias], top_diff=top_diff)
    np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-5)
    # d top / d weight[o, c, i, j] and d top / d x by the same tap slices as `correlate`
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    _, _, oh, ow = expected.shape
    xp = np.zeros((n, c, h + 2 * pad[0], w + 2 * pad[1]))
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = x
    xp_grad = np.zeros_like(xp)
    w_expected = np.zeros(weight.shape)
    og = o // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (oh - 1) + 1, stride[0])
                cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (ow - 1) + 1, stride[1])
                dy = top_diff[:, g * og:(g + 1) * og].astype(np.float64)
                w_expected[g * og:(g + 1) * og, :, i, j] = np.einsum(
                    "nohw,nchw->oc", dy, xp[:, g * cg:(g + 1) * cg, rows, cols])
                xp_grad[:, g * cg:(g + 1) * cg, rows, cols] += np.einsum(
                    "nohw,oc->nchw", dy, weight[g * og:(g + 1) * og, :, i, j])
    np.testing.assert_allclose(w_grad, w_expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_grad, xp_grad[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b_grad, top_diff.sum(axis=(0, 2, 3)), rtol=1e-5)
    if live:
        dead = np.ones(weight.shape[2:], bool)
        dead[live[0].start:live[0].stop, live[1].start:live[1].stop] = False
        assert np.all(w_grad[:, :, dead] == 0) and np.all(w_expected[:, :, dead] == 0)
    # another spatial size at run time: the whole kernel again
    bigger = r.standard_normal((1, c, h + 3, w + 3)).astype(np.float32)
    (top,), _, _ = run(layer, bigger, blobs=[weight, bias])
    np.testing.assert_allclose(top, correlate(bigger, weight, bias, stride, pad, dilation, group), rtol=1e-5,
                               atol=1e-5)


def test_convolution_reads_stride_pad_per_axis_and_no_bias():
    r = rng(6)
    x = r.standard_normal((1, 2, 9, 6)).astype(np.float32)
    layer = make(conv_params(3, "kernel_size: 3 kernel_size: 1 stride: 2 stride: 1 pad: 1 pad: 0 "
                                "bias_term: false"), x.shape, layer_type="Convolution")
    specs = layer.blob_specs()
    assert [s.shape for s in specs] == [(3, 2, 3, 1)]
    weight = r.standard_normal(specs[0].shape).astype(np.float32)
    (top,), _, _ = run(layer, x, blobs=[weight])
    np.testing.assert_allclose(top, correlate(x, weight, None, (2, 1), (1, 0), (1, 1), 1), rtol=1e-5, atol=1e-5)


def test_convolution_fillers_come_from_the_param():
    layer = make(conv_params(2, "kernel_size: 1 weight_filler { type: 'xavier' } bias_filler { type: 'constant' "
                                "value: 0.5 }"), (1, 3, 4, 4), layer_type="Convolution")
    weight, bias = layer.blob_specs()
    assert weight.filler.type == "xavier" and bias.filler.value == 0.5
    plain = make(conv_params(2, "kernel_size: 1"), (1, 3, 4, 4), layer_type="Convolution")
    assert plain.blob_specs()[0].filler.type == "constant" and plain.blob_specs()[0].filler.value == 0


def test_convolution_several_bottoms_share_the_weights():
    r = rng(7)
    a, b = (r.standard_normal((1, 2, 5, 5)).astype(np.float32) for _ in range(2))
    lp_text = conv_params(3, "kernel_size: 3")
    layer = make(lp_text, a.shape, b.shape, layer_type="Convolution", tops=2)
    weight, bias = r.standard_normal((3, 2, 3, 3)).astype(np.float32), np.zeros(3, np.float32)
    tops, _, _ = run(layer, a, b, blobs=[weight, bias])
    for top, x in zip(tops, (a, b), strict=True):
        np.testing.assert_allclose(top, correlate(x, weight, None, (1, 1), (0, 0), (1, 1), 1), rtol=1e-5, atol=1e-5)


def test_convolution_axis_flattens_leading_axes():
    r = rng(8)
    x = r.standard_normal((2, 3, 4, 6, 6)).astype(np.float32)
    layer = make(conv_params(5, "kernel_size: 3 axis: 2"), x.shape, layer_type="Convolution")
    assert layer.top_shapes == [(2, 3, 5, 4, 4)]
    weight, bias = r.standard_normal((5, 4, 3, 3)).astype(np.float32), r.standard_normal(5).astype(np.float32)
    (top,), _, _ = run(layer, x, blobs=[weight, bias])
    expected = correlate(x.reshape(6, 4, 6, 6), weight, bias, (1, 1), (0, 0), (1, 1), 1).reshape(top.shape)
    np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride, pad, dilation, group, kernel", [
    ((2, 2), (1, 1), (1, 1), 1, (3, 3)),
    ((3, 2), (0, 2), (2, 1), 2, (2, 3)),
    ((1, 1), (0, 0), (1, 1), 3, (1, 1)),
])
def test_deconvolution_against_scatter_loop(stride, pad, dilation, group, kernel):
    r = rng(9)
    x = r.standard_normal((2, 6, 4, 5)).astype(np.float32)
    params = (f"group: {group} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
              f"stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} dilation: {dilation[0]} "
              f"dilation: {dilation[1]}")
    layer = make(conv_params(3 * group, params), x.shape, layer_type="Deconvolution")
    specs = layer.blob_specs()
    assert [s.shape for s in specs] == [(6, 3, *kernel), (3 * group,)]
    out_h = stride[0] * (4 - 1) + dilation[0] * (kernel[0] - 1) + 1 - 2 * pad[0]
    out_w = stride[1] * (5 - 1) + dilation[1] * (kernel[1] - 1) + 1 - 2 * pad[1]
    assert layer.top_shapes == [(2, 3 * group, out_h, out_w)]
    weight = r.standard_normal(specs[0].shape).astype(np.float32)
    bias = r.standard_normal(specs[1].shape).astype(np.float32)
    diff = r.standard_normal(layer.top_shapes[0]).astype(np.float32)
    expected, dx, dweight = deconvolve(x, weight, bias, stride, pad, dilation, group, diff)
    (top,), grads, (gweight, gbias) = run(layer, x, blobs=[weight, bias], top_diff=diff)
    np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gweight, dweight, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gbias, diff.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layer_type, params, shape, message", [
    ("Convolution", "num_output: 4 kernel_size: 3 group: 2", (1, 5, 8, 8),
     r"channels \(5\) must be divisible by group \(2\)"),
    ("Deconvolution", "num_output: 4 kernel_size: 3 group: 2", (1, 5, 8, 8),
     r"channels \(5\) must be divisible by group \(2\)"),
    ("Convolution", "num_output: 3 kernel_size: 3 group: 2", (1, 4, 8, 8), "Number of output should be multiples"),
    ("Convolution", "num_output: 3 kernel_size: 3", (1, 4, 8, 8, 8), "only 2-D convolution is supported"),
    ("Convolution", "num_output: 3 kernel_size: 3", (4, 8), "only 2-D convolution is supported"),
    ("Convolution", "num_output: 3", (1, 4, 8, 8), "kernel_size must be specified once"),
    ("Convolution", "num_output: 3 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 4, 8, 8), "not both"),
    ("Convolution", "num_output: 3 kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 4, 8, 8),
     "specified 3 times; 2 spatial dims"),
    ("Convolution", "num_output: 3 kernel_h: 3", (1, 4, 8, 8), "Filter dimensions must be nonzero"),
    ("Convolution", "kernel_size: 3", (1, 4, 8, 8), "num_output must be > 0"),
    ("Convolution", "num_output: 3 kernel_size: 9", (1, 4, 8, 8), "not positive"),
    ("Deconvolution", "num_output: 3 kernel_size: 3 pad: 5", (1, 4, 2, 2), "not positive"),
])
def test_convolution_errors(layer_type, params, shape, message):
    with pytest.raises(CaffeError, match=message) as err:
        make(f"convolution_param {{ {params} }}", shape, layer_type=layer_type)
    assert f"layer 'L' ({layer_type})" in str(err.value)


# -- LRN -------------------------------------------------------------------------------------------

def lrn_loop(x, size, alpha, beta, k, within):
    """LRN by its definition in float64: the channel window, or the n x n spatial window with divisor n^2."""
    n, c, h, w = x.shape
    pre = (size - 1) // 2
    y = np.zeros_like(x, dtype=np.float64)
    for i in range(n):
        for j in range(c):
            for a in range(h):
                for b in range(w):
                    if within:
                        window = x[i, j, max(a - pre, 0):a + pre + 1, max(b - pre, 0):b + pre + 1]
                        scale = 1 + alpha * (window.astype(np.float64) ** 2).sum() / size ** 2
                    else:
                        window = x[i, max(j - pre, 0):j + pre + 1, a, b]
                        scale = k + alpha / size * (window.astype(np.float64) ** 2).sum()
                    y[i, j, a, b] = x[i, j, a, b] * scale ** -beta
    return y


@pytest.mark.parametrize("region, size, alpha, beta, k", [
    ("WITHIN_CHANNEL", 3, 0.5, 0.75, 7.0),   # k is ignored
    ("WITHIN_CHANNEL", 5, 2.0, 0.6, 1.0),
    ("WITHIN_CHANNEL", 1, 1.0, 0.75, 1.0),
    ("ACROSS_CHANNELS", 3, 0.9, 0.75, 2.0),
])
def test_lrn_against_loop(region, size, alpha, beta, k):
    x = (rng(10).standard_normal((2, 4, 5, 6)) * 2).astype(np.float32)
    layer = make(f"lrn_param {{ norm_region: {region} local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}",
                 x.shape, layer_type="LRN")
    assert layer.top_shapes == [x.shape]
    (top,), _, _ = run(layer, x)
    np.testing.assert_allclose(top, lrn_loop(x, size, alpha, beta, k, region == "WITHIN_CHANNEL"),
                               rtol=1e-5, atol=1e-6)


def test_lrn_within_channel_gradient_is_the_exact_derivative():
    # Caffe's Power/Pooling/Eltwise backwards compose to the exact derivative: compare with central
    # differences of the numpy loop (float64), the layer run in float64 too.
    x = rng(11).standard_normal((1, 2, 4, 3)) * 2
    layer = make("lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 }", x.shape,
                 layer_type="LRN")
    diff = rng(12).standard_normal(x.shape)
    _, grads, _ = run(layer, x, top_diff=diff)
    numeric = np.zeros_like(x)
    eps = 1e-6
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = ((lrn_loop(plus, 3, 0.5, 0.75, 1, True) - lrn_loop(minus, 3, 0.5, 0.75, 1, True)) * diff
                        ).sum() / (2 * eps)
    np.testing.assert_allclose(grads[0], numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("channels, size", [(12, 5), (5, 5), (3, 3), (7, 1), (256, 5)])
def test_lrn_channel_window_sum_pooled_is_the_adds_bit_for_bit(channels, size):
    """The GPU's one-kernel window sum (a 3-D average pool, divisor 1) against the CPU's adds of shifted
    slices, at the window's edges too; both against float64 sums of the window. (With fewer channels than
    the window the GPU keeps the adds: torch's pool refuses an input smaller than its kernel.)"""
    from converter.layers.vision import channel_window_sum, channel_window_sum_pooled

    t = torch.from_numpy((rng(channels).standard_normal((3, channels, 4, 2)) ** 2).astype(np.float32))
    adds, pooled = channel_window_sum(t, size), channel_window_sum_pooled(t, size)
    assert torch.equal(adds, pooled)
    pre = (size - 1) // 2
    exact = np.stack([t.double().numpy()[:, max(c - pre, 0):c + pre + 1].sum(1) for c in range(channels)], 1)
    np.testing.assert_allclose(pooled.numpy(), exact, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the pooled form is the GPU's)")
def test_lrn_channel_window_sum_on_cuda_equals_the_cpu_adds():
    from converter.layers.vision import channel_window_sum

    t = torch.from_numpy((rng(3).standard_normal((4, 96, 5, 5)) ** 2).astype(np.float32))
    assert torch.equal(channel_window_sum(t.cuda(), 5).cpu(), channel_window_sum(t, 5))


@pytest.mark.parametrize("params, shape, message", [
    ("local_size: 4", (1, 3, 4, 4), r"odd values for local_size \(got 4\)"),
    ("local_size: 3", (3, 4, 4), "Input must have 4 axes"),
])
def test_lrn_errors(params, shape, message):
    with pytest.raises(CaffeError, match=message):
        make(f"lrn_param {{ {params} }}", shape, layer_type="LRN")


def _caffe_conv_loops(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride, pad, dilation, group) -> np.ndarray:
    """Caffe's convolution written as its definition (float64 loops): top[n, o, y, x] = bias[o] + the sum over
    the group's channels and kernel taps of weight * bottom, outside the padding."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for oc in range(o):
        g = oc // (o // group)
        for yy in range(oh):
            for xx in range(ow):
                acc = np.full(n, float(b[oc]))
                for ci in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            r = yy * stride[0] - pad[0] + i * dilation[0]
                            s = xx * stride[1] - pad[1] + j * dilation[1]
                            if 0 <= r < h and 0 <= s < wd:
                                acc += w[oc, ci, i, j] * x[:, g * cg + ci, r, s].astype(np.float64)
                out[:, oc, yy, xx] = acc
    return out


@pytest.mark.parametrize("kernel, stride, pad, dilation, group", [
    ((3, 3), (1, 1), (0, 0), (1, 1), 1), ((5, 3), (2, 1), (2, 1), (1, 1), 1), ((3, 3), (1, 2), (1, 1), (2, 1), 1),
    ((3, 3), (2, 2), (1, 1), (1, 1), 2), ((11, 11), (4, 4), (0, 0), (1, 1), 1)])
def test_caffe_engine_is_im2col_gemm_with_caffes_numbers(kernel, stride, pad, dilation, group):
    """engine: CAFFE (im2col + one batched GEMM, and autograd's two GEMMs back) against the definition, and
    against torch's convolution (engine DEFAULT) for the gradients."""
    from converter.layers.vision import im2col_conv

    rng = np.random.default_rng(3)
    size = 23 if kernel[0] == 11 else 9
    x = rng.standard_normal((2, 4, size, size + 2)).astype(np.float32)
    w = rng.standard_normal((6, 4 // group, *kernel)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    expected = _caffe_conv_loops(x, w, b, stride, pad, dilation, group)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = im2col_conv(xt, wt, bt, stride, pad, dilation, group)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-4)
    top_diff = torch.from_numpy(rng.standard_normal(y.shape).astype(np.float32))
    y.backward(top_diff)
    xr, wr, br = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.conv2d(xr, wr, br, stride, pad, dilation, group).backward(top_diff)
    for ours, ref in ((xt, xr), (wt, wr), (bt, br)):
        np.testing.assert_allclose(ours.grad.numpy(), ref.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_engine_field_and_net_default_pick_the_convolution():
    """A layer's own `engine: CAFFE` wins; `--engine caffe` (set_net_engine) sets the DEFAULT ones only."""
    from converter.layers.vision import set_net_engine

    def conv(engine: str) -> object:
        lp = text_format.Parse(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param '
                               f'{{ num_output: 2 kernel_size: 3 engine: {engine} }}', caffe_pb2.LayerParameter())
        return layer_class(lp)(lp, [(1, 1, 5, 5)], caffe_pb2.TEST)

    assert conv("CAFFE").im2col and not conv("CUDNN").im2col and not conv("DEFAULT").im2col
    set_net_engine("caffe")
    try:
        assert conv("DEFAULT").im2col and not conv("CUDNN").im2col
    finally:
        set_net_engine(None)
    assert not conv("DEFAULT").im2col
