"""Pooling's two forms agree: eager (torch's ceil mode where it has Caffe's count; the -FLT_MAX rule as
``threshold``, skipped after a min check on the CPU) and traced for ONNX (explicit padding, floor mode,
compare + where).

The eager form against Caffe's own loops is in ``test_layers_vision.py``; here the traced form is held to
the eager one, values, masks and gradients, for layers that take each path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.layers import layer_class

FLT_MAX = float(np.finfo(np.float32).max)


def pooling(params: str, shape: tuple[int, ...], tops: int = 1):
    lp = caffe_pb2.LayerParameter(name="P", type="Pooling", bottom=["b"], top=[f"t{i}" for i in range(tops)])
    text_format.Merge(params, lp.pooling_param)
    return layer_class(lp)(lp, [shape], caffe_pb2.TRAIN)


class _Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return tuple(self.layer([x], []))


def forward_backward(fn, x: np.ndarray, diff: np.ndarray):
    xt = torch.tensor(x, requires_grad=True)
    tops = fn(xt)
    tops[0].backward(torch.tensor(diff))
    return [t.detach().numpy() for t in tops], xt.grad.numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("params, shape, path", [
    ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 13, 13), "floor"),
    ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 2, 2), "ceil"),     # thesis MNIST pool2: 2x2 -> 1x1
    ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 14, 14), "ceil"),   # ceil overhang
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (1, 2, 4, 4), "ceil"),
    ("pool: MAX kernel_size: 1 stride: 2", (1, 2, 32, 32), "explicit"),  # empty last windows (torch: 16)
    ("pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1", (1, 2, 7, 8), "explicit"),
    ("pool: AVE kernel_size: 3 stride: 2", (2, 3, 14, 14), "ceil"),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 2, 4, 4), "ceil"),
    ("pool: AVE kernel_size: 1 stride: 2", (1, 2, 32, 32), "explicit"),
])
@pytest.mark.parametrize("special", [True, False])
def test_traced_form_equals_eager_form(params, shape, path, special):
    tops = 2 if "MAX" in params else 1
    layer = pooling(params, shape, tops)
    assert (layer.native, layer.ceil_native) == {"floor": (True, False), "ceil": (False, True),
                                                 "explicit": (False, False)}[path]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if special:  # windows of only -inf / -FLT_MAX: -FLT_MAX, mask -1, no gradient
        x.flat[::7] = -np.inf
        x.flat[3::11] = -FLT_MAX
    diff = np.random.default_rng(1).standard_normal(layer.top_shapes[0]).astype(np.float32)
    eager, eager_grad = forward_backward(lambda t: layer([t], []), x, diff)
    traced_fn = torch.jit.trace(_Wrap(layer), torch.tensor(x), check_trace=False)
    traced, traced_grad = forward_backward(traced_fn, x, diff)
    graph = str(traced_fn.inlined_graph)
    assert "threshold" not in graph and ("aten::where" in graph) == (tops == 2)  # MAX: compare + where
    assert ("aten::pad" in graph) == (path != "floor")
    assert eager[0].shape == layer.top_shapes[0]
    for a, b in zip(eager, traced, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
    np.testing.assert_allclose(eager_grad, traced_grad, rtol=1e-6, atol=1e-7)
    # One top: the same layer without the mask gives the same values and gradient.
    if tops == 2:
        single, single_grad = forward_backward(lambda t: pooling(params, shape)([t], []), x, diff)
        np.testing.assert_array_equal(single[0], eager[0])
        np.testing.assert_array_equal(single_grad, eager_grad)


def test_ceil_path_max_is_caffes_window_max():
    # 2x2 input, k3 s2: Caffe's one window is the whole (clipped) plane; the gradient goes to its argmax.
    x = np.array([[[[1.0, 5.0], [5.0, -2.0]]], [[[-np.inf, -np.inf], [-np.inf, -FLT_MAX]]]], np.float32)
    layer = pooling("pool: MAX kernel_size: 3 stride: 2", x.shape, tops=2)
    (top, mask), grad = forward_backward(lambda t: layer([t], []), x, np.ones((2, 1, 1, 1), np.float32))
    np.testing.assert_array_equal(top.ravel(), [5.0, -FLT_MAX])
    np.testing.assert_array_equal(mask.ravel(), [1, -1])  # first maximum in row-major order; none
    np.testing.assert_array_equal(grad.reshape(2, 4), [[0, 1, 0, 0], [0, 0, 0, 0]])
