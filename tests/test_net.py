"""CaffeNet's own rules (net.cpp): sharing, multipliers, losses, in-place layers, splits, batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.errors import CaffeError
from converter.io import filter_net, net_state, parse_net
from converter.net import CaffeNet


def build(text: str, phase: str = "TRAIN", **shapes) -> CaffeNet:
    torch.manual_seed(0)
    return CaffeNet(filter_net(parse_net(text), net_state(phase)), shapes or None)


SIAMESE = """
input: "a" input_shape { dim: 4 dim: 3 }
input: "b" input_shape { dim: 4 dim: 3 }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "fa"
  param { name: "w" lr_mult: 1 } param { name: "bias" lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" } bias_filler { type: "uniform" } } }
layer { name: "ip_p" type: "InnerProduct" bottom: "b" top: "fb"
  param { name: "w" } param { name: "bias" }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fa" bottom: "fb" top: "loss" }
"""


def test_shared_params_are_one_blob_with_summed_gradients():
    net = build(SIAMESE)
    assert len(net.params) == 2  # w and bias, once each (Caffe's learnable_params)
    assert [(lb.owner, lb.lr_mult, lb.decay_mult) for lb in net.learnable] == [("ip.0", 1.0, 1.0), ("ip.1", 2.0, 0.0)]
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    blobs = net({"a": a, "b": b})
    net.loss(blobs).backward()
    w, bias = (p.detach().numpy() for p in net.params)
    fa, fb = a.numpy() @ w.T + bias, b.numpy() @ w.T + bias
    d = (fa - fb) / 4  # EuclideanLoss: sum (fa-fb)^2 / (2N)
    expected = d.T @ a.numpy() - d.T @ b.numpy()  # both towers' gradients, summed in the one blob
    np.testing.assert_allclose(net.params[0].grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.params[1].grad.numpy(), 0 * d.sum(0), atol=1e-6)  # the bias cancels


def test_shared_param_multiplier_clash_is_refused():
    text = SIAMESE.replace('param { name: "w" } param { name: "bias" }', 'param { name: "w" lr_mult: 3 } param { name: "bias" }')
    with pytest.raises(CaffeError, match="layer 'ip_p' \\(InnerProduct\\): shared param 'w' has lr_mult 3.0 but 1.0 in ip.0"):
        build(text)


def test_a_sharer_sets_the_multiplier_the_owner_left_unset():
    text = SIAMESE.replace('param { name: "w" lr_mult: 1 }', 'param { name: "w" }').replace(
        'param { name: "w" } param { name: "bias" }', 'param { name: "w" lr_mult: 5 } param { name: "bias" }')
    assert build(text).learnable[0].lr_mult == 5.0


def test_permissive_sharing_needs_equal_counts_only():
    text = """input: "x" input_shape { dim: 2 dim: 6 }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "ya" param { name: "w" } inner_product_param { num_output: 4 bias_term: false } }
layer { name: "b" type: "InnerProduct" bottom: "x" top: "yb" param { name: "w" share_mode: PERMISSIVE }
  inner_product_param { num_output: 4 bias_term: false transpose: true } }
"""
    net = build(text)
    assert len(net.params) == 1 and net.blob_uses[net.layer_by_name("b")][0].shape == (6, 4)
    with pytest.raises(CaffeError, match="STRICT sharing"):
        build(text.replace(" share_mode: PERMISSIVE", ""))


def test_lr_mult_zero_means_no_gradient_but_backprop_continues():
    text = """input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "frozen" type: "InnerProduct" bottom: "x" top: "h" param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "top" type: "InnerProduct" bottom: "h" top: "y" inner_product_param { num_output: 1 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x0" top: "loss" }
input: "x0" input_shape { dim: 2 dim: 1 }
"""
    net = build(text.replace('input: "x0" input_shape { dim: 2 dim: 1 }\n', "").replace(
        'input: "x" input_shape { dim: 2 dim: 3 }', 'input: "x" input_shape { dim: 2 dim: 3 }\ninput: "x0" input_shape { dim: 2 dim: 1 }'))
    x = torch.randn(2, 3, requires_grad=True)
    net.loss(net({"x": x, "x0": torch.zeros(2, 1)})).backward()
    assert net.params[0].grad is None and net.params[1].grad is None
    assert net.params[2].grad is not None and x.grad is not None and x.grad.abs().sum() > 0


def test_loss_weights_and_defaults():
    text = """input: "s" input_shape { dim: 3 dim: 4 }
input: "l" input_shape { dim: 3 }
layer { name: "l1" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "l1" }
layer { name: "l2" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "l2" loss_weight: 0.25 }
layer { name: "sig" type: "Sigmoid" bottom: "s" top: "sig" loss_weight: 2 }
"""
    net = build(text)
    s = torch.randn(3, 4)
    labels = torch.tensor([0.0, 3.0, 1.0])
    blobs = net({"s": s, "l": labels})
    ce = float(torch.nn.functional.cross_entropy(s, labels.long()))
    expected = ce * 1.0 + ce * 0.25 + 2 * float(torch.sigmoid(s).sum())
    assert float(net.loss(blobs)) == pytest.approx(expected, rel=1e-6)
    assert net.loss_blobs() == [("l1", 1.0), ("l2", 0.25), ("sig", 2.0)]
    with pytest.raises(CaffeError, match="loss_weight must be given once per top"):
        build(text.replace("loss_weight: 0.25", "loss_weight: 0.25 loss_weight: 1"))


def test_in_place_layers_and_implicit_splits():
    text = """input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
layer { name: "t1" type: "TanH" bottom: "x" top: "a" }
layer { name: "t2" type: "Sigmoid" bottom: "x" top: "b" }
"""
    net = build(text)
    x = torch.randn(2, 3, requires_grad=True)
    blobs = net({"x": x})
    assert net.outputs == ["a", "b"]
    r = torch.relu(x.detach())
    np.testing.assert_allclose(blobs["x"].detach().numpy(), r.numpy())
    (blobs["a"].sum() + blobs["b"].sum()).backward()
    s = torch.sigmoid(r)
    expected = ((1 - torch.tanh(r) ** 2) + s * (1 - s)) * (x.detach() > 0)  # split: both gradients summed
    np.testing.assert_allclose(x.grad.numpy(), expected.numpy(), rtol=1e-6)


def test_dropout_is_identity_in_a_test_net():
    text = """input: "x" input_shape { dim: 2 dim: 50 }
layer { name: "drop" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.5 } }
"""
    x = torch.ones(2, 50)
    assert torch.equal(build(text, "TEST")({"x": x})["y"], x)
    y = build(text, "TRAIN")({"x": x})["y"]
    assert set(y.unique().tolist()) <= {0.0, 2.0} and 0 < float((y == 0).float().mean()) < 1


def test_a_net_built_for_one_batch_runs_with_another():
    text = """input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { name: "n" type: "LRN" bottom: "x" top: "n" lrn_param { local_size: 5 alpha: 1 beta: 0.75 } }
layer { name: "bn" type: "BatchNorm" bottom: "n" top: "b" batch_norm_param { use_global_stats: false } }
layer { name: "flat" type: "Flatten" bottom: "b" top: "f" }
layer { name: "ip" type: "InnerProduct" bottom: "f" top: "y" inner_product_param { num_output: 3 } }
"""
    net = build(text)
    for n in (1, 5):
        assert tuple(net({"x": torch.randn(n, 3, 4, 4)})["y"].shape) == (n, 3)


def test_lrn_with_fewer_channels_than_its_window():
    text = """input: "x" input_shape { dim: 1 dim: 2 dim: 1 dim: 1 }
layer { name: "n" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 5 alpha: 1 beta: 0.75 k: 1 } }
"""
    x = torch.tensor([[[[2.0]], [[3.0]]]])
    y = build(text)({"x": x})["y"].reshape(-1).numpy()
    scale = 1 + (4 + 9) / 5  # both channels fall inside each one's 5-channel window
    np.testing.assert_allclose(y, np.array([2.0, 3.0]) * scale ** -0.75, rtol=1e-6)


def test_unknown_and_duplicate_blobs_are_refused():
    with pytest.raises(CaffeError, match="unknown bottom blob 'nope'"):
        build('input: "x" input_shape { dim: 1 }\nlayer { name: "r" type: "ReLU" bottom: "nope" top: "y" }')
    with pytest.raises(CaffeError, match="no input given for top 'x'"):
        build('input: "x" input_shape { dim: 1 }\nlayer { name: "r" type: "ReLU" bottom: "x" top: "y" }')({})


def test_a_loss_layer_without_a_top_gets_an_anonymous_one():
    """Caffe 1.0's AutoTopBlobs: old V1 prototxts leave the loss layer's top out; the loss still counts, and
    the anonymous top is not a net output."""
    from converter.io import parse_net

    text = """
    input: "x" input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1
    input: "label" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
    layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "ip" inner_product_param { num_output: 4 } }
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" }
    """
    net = CaffeNet(parse_net(text))
    assert net.outputs == []
    x = torch.randn(2, 3, 1, 1)
    label = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)
    blobs = net({"x": x, "label": label})
    logits = blobs["ip"]
    expected = torch.nn.functional.cross_entropy(logits, label.flatten().long())  # mean over the batch
    assert float(net.loss(blobs)) == pytest.approx(float(expected), rel=1e-6)
