"""Real Caffe files: the trained LeNet on real MNIST, every conformance net built with Caffe's shapes,
and our .caffemodel files read by OpenCV's independent Caffe importer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.io import filter_net, net_state, read_net
from converter.net import CaffeNet
from converter.weights import load_weights, save_weights
from data_prep.idx import read_idx
from tests.golden import REFERENCE

DATA = REFERENCE.parent / "data"
CONFORMANCE = REFERENCE / "conformance"


def require(path):
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def test_trained_lenet_classifies_real_mnist_at_99_14_percent():
    model = require(DATA / "caffe_models" / "lenet_mnist")
    images = read_idx(require(DATA / "mnist" / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    proto = filter_net(read_net(model / "lenet.prototxt"), net_state("TEST"))
    net = CaffeNet(proto, {"data": (1000, 1, 28, 28)})
    ignored = load_weights(net, model / "lenet_iter_10000.caffemodel")
    assert ignored == ["mnist", "loss"]  # the training net's data and loss layers are not in the deploy net
    correct = 0
    with torch.no_grad():
        for start in range(0, 10000, 1000):
            x = torch.from_numpy(images[start:start + 1000, None].astype(np.float32) * 0.00390625)
            scores = net({"data": x})["prob"]
            correct += int((scores.argmax(1).numpy() == labels[start:start + 1000]).sum())
    assert correct == 9914


# Blob shapes listed at the end of conformance/SOURCES.md (Caffe's rounding).
EXPECTED = {
    "09_cifar10_quick_train_test.prototxt": ({"data": (100, 3, 32, 32), "label": (100,)}, {
        "conv1": (100, 32, 32, 32), "pool1": (100, 32, 16, 16), "pool2": (100, 32, 8, 8),
        "pool3": (100, 64, 4, 4), "ip1": (100, 64), "ip2": (100, 10)}),
    "05_bvlc_reference_caffenet_train_val.prototxt": ({"data": (256, 3, 227, 227), "label": (256,)}, {
        "conv1": (256, 96, 55, 55), "pool1": (256, 96, 27, 27), "pool2": (256, 256, 13, 13),
        "pool5": (256, 256, 6, 6), "fc6": (256, 4096), "fc7": (256, 4096), "fc8": (256, 1000)}),
    "07_bvlc_alexnet_train_val.prototxt": ({"data": (256, 3, 227, 227), "label": (256,)}, {
        "conv1": (256, 96, 55, 55), "pool1": (256, 96, 27, 27), "pool2": (256, 256, 13, 13),
        "pool5": (256, 256, 6, 6), "fc6": (256, 4096), "fc7": (256, 4096), "fc8": (256, 1000)}),
    "08_bvlc_googlenet_train_val.prototxt": ({"data": (32, 3, 224, 224), "label": (32,)}, {
        "conv1/7x7_s2": (32, 64, 112, 112), "pool1/3x3_s2": (32, 64, 56, 56),
        "pool5/7x7_s1": (32, 1024, 1, 1)}),
    "12_thesis_siamese_mnist_egomotion.prototxt": (None, {
        "conv1": (None, 96, 5, 5), "pool1": (None, 96, 2, 2), "pool2": (None, 256, 1, 1)}),
}


def data_shapes_for(proto) -> dict:
    """Data tops of a net whose LMDBs are absent: shapes as the files' batch sizes and crops say."""
    shapes = {}
    for lp in proto.layer:
        if lp.type != "Data":
            continue
        batch = lp.data_param.batch_size
        crop = lp.transform_param.crop_size
        name = lp.name
        if "label" in name or "label" in lp.top[0]:
            shapes[lp.top[0]] = (batch, 3, 1, 1)
        else:
            channels = 2 if "pair" in lp.top[0] or "mnist" in lp.data_param.source else 3
            side = crop or (28 if channels == 2 else 32)
            shapes[lp.top[0]] = (batch, channels, side, side)
        if len(lp.top) > 1:
            shapes[lp.top[1]] = (batch,)
    return shapes


@pytest.mark.parametrize("name", sorted(p.name for p in CONFORMANCE.glob("*.prototxt") if "solver" not in p.name)
                         if CONFORMANCE.is_dir() else ["absent"])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_conformance_net_builds(name, phase):
    if name == "absent":
        pytest.skip("conformance folder absent")
    stages = ["test-on-train"] if name.startswith("12_") and phase == "TEST" else []
    proto = filter_net(read_net(CONFORMANCE / name), net_state(phase, stages=stages))
    given, expected = EXPECTED.get(name, (None, {}))
    shapes = given if given else data_shapes_for(proto)
    if given and phase == "TEST":
        shapes = {k: (50,) + v[1:] for k, v in given.items()}
    net = CaffeNet(proto, shapes)
    batch = next(iter(shapes.values()))[0]
    for blob, shape in expected.items():
        want = (batch,) + shape[1:] if shape[0] is None or phase == "TEST" else shape
        assert net.blob_shapes[blob] == want, (name, blob)
    assert net.num_parameters() > 0


def test_building_alexnet_counts_its_parameters():
    """BVLC AlexNet builds with its 60,965,224 parameters, counted by hand from the prototxt: conv1 34,944;
    conv2 307,456 and conv4 663,936 and conv5 442,624 (group 2); conv3 885,120; fc6 37,752,832; fc7 16,781,312;
    fc8 4,097,000. (Its build time is measured in benchmarks/bench_converter.py, not asserted here.)"""
    proto = filter_net(read_net(require(CONFORMANCE / "07_bvlc_alexnet_train_val.prototxt")), net_state("TRAIN"))
    net = CaffeNet(proto, {"data": (256, 3, 227, 227), "label": (256,)})
    assert net.num_parameters() == 34_944 + 307_456 + 885_120 + 663_936 + 442_624 + 37_752_832 + 16_781_312 + 4_097_000


DEPLOY_LENET = """name: "LeNet"
input: "data" input_shape { dim: 2 dim: 1 dim: 28 dim: 28 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } bias_filler { type: "uniform" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } bias_filler { type: "uniform" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "uniform" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "uniform" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

DEPLOY_CAFFENET_SMALL = """name: "CaffeNetDeploy"
input: "data" input_shape { dim: 2 dim: 3 dim: 227 dim: 227 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv3" type: "Convolution" bottom: "norm2" top: "conv3"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 256 weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "uniform" } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc6" top: "fc8"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "uniform" } } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def thesis_tower_deploy() -> str:
    """The thesis MNIST net's tower up to relu2 as a deploy net.

    Its pool2 (k3 s2 on 2×2 → 1×1 by Caffe's ceil rule) is left out: OpenCV 4.14's importer cannot shape
    a window larger than its input (it computes a negative size), so there is nothing to compare with.
    """
    return """name: "ThesisTower"
input: "data" input_shape { dim: 2 dim: 1 dim: 28 dim: 28 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "uniform" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 group: 2 kernel_size: 5 weight_filler { type: "gaussian" std: 0.1 }
  bias_filler { type: "uniform" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "relu2" }
"""


@pytest.mark.parametrize("text,output", [(DEPLOY_LENET, "prob"), (DEPLOY_CAFFENET_SMALL, "prob"),
                                         (thesis_tower_deploy(), "relu2")], ids=["lenet", "caffenet", "thesis"])
def test_our_caffemodels_load_in_opencv_dnn(text, output, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from converter.io import parse_net

    (tmp_path / "deploy.prototxt").write_text(text)
    proto = filter_net(parse_net(text), net_state("TEST"))
    torch.manual_seed(3)
    net = CaffeNet(proto)
    save_weights(net, tmp_path / "w.caffemodel")
    shape = net.input_shapes()["data"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ours = net({"data": torch.from_numpy(x)})[output].numpy()
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "deploy.prototxt"), str(tmp_path / "w.caffemodel"))
    cv_net.setInput(x)
    theirs = cv_net.forward(output)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(np.abs(ours).max()))
