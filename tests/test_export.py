"""``egomotion export``: deploy-form cutting, ONNX parity with the module, Caffe's shapes, dynamic batch.

Parity (ONNX Runtime on the CPU vs the PyTorch module, max |ort - torch| / max |torch| <= 1e-5 per
output, at batch sizes 1 and 2) is checked inside :func:`runner.export.export_model` and fails the
test by raising. The golden layer cases add a stronger check where the layers have no phase
behaviour: ORT's outputs on Caffe's own inputs equal BVLC Caffe's blobs.

The big conformance nets (CaffeNet, AlexNet, GoogLeNet) are exported *narrowed* (every num_output
divided by 8, by 16 for GoogLeNet, inner products capped at 64 outputs) so the file stays fast; the layer types, kernels,
strides, pads, groups and pooling geometry are untouched. The thesis KITTI tower is exported at full
width.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.io import filter_net, net_state, parse_net, read_net
from converter.net import CaffeNet
from runner.cli import main
from runner.deploy import DeployNet, build_deploy, deploy_net
from runner.export import export_model
from runner.ort import max_rel_error, ort_session
from tests.golden import FWD_ATOL, FWD_RTOL, GOLDEN, REFERENCE, load, require_golden

CONFORMANCE = REFERENCE / "conformance"


pytestmark = pytest.mark.usefixtures("one_torch_thread")
TIMING = REFERENCE / "timing"
LENET = REFERENCE.parent / "data" / "caffe_models" / "lenet_mnist"
MNIST = REFERENCE.parent / "data" / "mnist"


def export_plan(net: CaffeNet, plan: DeployNet, tmp_path: Path | None = None):
    model, errors = export_model(net, plan, tmp_path / "m.onnx" if tmp_path else None)
    assert errors and max(errors.values()) <= 1e-5
    return model, errors


# -- golden layer cases ---------------------------------------------------------------------------

GOLDEN_NETS = [("conv", "net.prototxt"), ("pool", "net.prototxt"), ("lrn", "net.prototxt"), ("ip", "net.prototxt"),
               ("neurons", "net.prototxt"), ("neurons", "net_fwd.prototxt"), ("bn", "net.prototxt"),
               ("bn", "net_test.prototxt"), ("shape", "net.prototxt")]
PHASE_FREE = {"conv", "pool", "lrn", "ip"}  # TEST export computes exactly what Caffe ran (in TRAIN)


def golden_weights(case: str, prototxt: str) -> Path:
    stem = prototxt.removesuffix(".prototxt")
    return GOLDEN / case / ("init.caffemodel" if stem == "net" else f"init_{stem}.caffemodel")


@pytest.mark.parametrize("case,prototxt", GOLDEN_NETS, ids=[f"{c}/{p}" for c, p in GOLDEN_NETS])
def test_golden_layer_nets_parity(case, prototxt):
    require_golden()
    net, plan = build_deploy(GOLDEN / case / prototxt, [golden_weights(case, prototxt)])
    model, errors = export_plan(net, plan)
    assert set(errors) == set(plan.outputs)
    if case not in PHASE_FREE:
        return
    session = ort_session(model)
    inputs = {n: load(case, "blobs", n) for n in plan.inputs}
    for name, value in zip(plan.outputs, session.run(plan.outputs, inputs), strict=True):
        expected = load(case, "blobs", name)
        assert value.shape == expected.shape, name
        np.testing.assert_allclose(value, expected, rtol=FWD_RTOL, atol=FWD_ATOL, err_msg=f"{case}: {name}")


def test_golden_argmax_export():
    """ArgMax exports as TopK of the reversed axis; ONNX Runtime gives Caffe's golden outputs."""
    require_golden()
    net, plan = build_deploy(GOLDEN / "shape" / "net_fwd.prototxt", [golden_weights("shape", "net_fwd.prototxt")])
    export_plan(net, plan)


def test_argmax_ties_on_onnx_runtime_are_caffes():
    """Among equal values Caffe's ArgMax puts the larger index first (std::greater on (value, index)
    pairs): the exported TopK must too."""
    proto = caffe_pb2.NetParameter()
    text_format.Parse('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 6 } } } '
                      'layer { name: "am" type: "ArgMax" bottom: "x" top: "i" argmax_param { top_k: 3 axis: 1 } }',
                      proto)
    net, plan = _build(proto, ["i"])
    model, _ = export_model(net, plan)
    x = np.array([[1, 5, 5, 0, 5, 2], [3, 3, 3, 3, 3, 3]], dtype=np.float32)
    got = ort_session(model).run(["i"], {"x": x})[0]
    np.testing.assert_array_equal(got, [[4, 2, 1], [5, 4, 3]])  # by hand: ties, larger index first


def _build(proto, outputs):
    plan = deploy_net(proto, list(outputs))
    return CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval(), plan


def test_loss_only_net_has_nothing_to_export(tmp_path, capsys):
    require_golden()
    rc = main(["export", "--model", str(GOLDEN / "loss" / "net.prototxt"), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "no outputs" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# -- conformance and thesis nets ------------------------------------------------------------------

def narrowed(proto: caffe_pb2.NetParameter, factor: int = 8) -> caffe_pb2.NetParameter:
    """Convolutions ``factor`` times narrower (>= 8, divisible by the group), inner products at most 64 wide."""
    for lp in proto.layer:
        if lp.type == "Convolution":
            p = lp.convolution_param
            p.num_output = max(8, p.num_output // factor // p.group * p.group)  # LRN needs >= local_size channels
        elif lp.type == "InnerProduct":
            lp.inner_product_param.num_output = min(lp.inner_product_param.num_output, 64)
    return proto


CONFORMANCE_NETS = [
    ("01_lenet_train_test.prototxt", (2, 1, 28, 28), False, (), ["ip2"]),
    ("03_mnist_siamese_train_test.prototxt", (2, 2, 28, 28), False, (), ["feat", "feat_p"]),
    ("05_bvlc_reference_caffenet_train_val.prototxt", (2, 3, 227, 227), True, (), ["fc8"]),
    ("07_bvlc_alexnet_train_val.prototxt", (2, 3, 227, 227), True, (), ["fc8"]),
    ("08_bvlc_googlenet_train_val.prototxt", (1, 3, 224, 224), True, (),
     ["loss1/classifier", "loss2/classifier", "loss3/classifier"]),
    ("09_cifar10_quick_train_test.prototxt", (2, 3, 32, 32), False, (), ["ip2"]),
    ("10_lenet_train_test_V1_v0.9999.prototxt", (2, 1, 28, 28), False, (), ["ip2"]),
    ("11_mnist_siamese_train_test_V1_rc.prototxt", (2, 2, 28, 28), False, (), ["feat", "feat_p"]),
    ("12_thesis_siamese_mnist_egomotion.prototxt", (2, 2, 28, 28), False, ("test-on-train",), None),
]


@pytest.mark.parametrize("name,shape,narrow,stages,outputs", CONFORMANCE_NETS, ids=[c[0][:2] for c in CONFORMANCE_NETS])
def test_conformance_nets_parity(name, shape, narrow, stages, outputs):
    if not CONFORMANCE.is_dir():
        pytest.skip("conformance prototxts absent")
    proto = filter_net(read_net(CONFORMANCE / name), net_state("TEST", 0, stages))
    if narrow:
        proto = narrowed(proto, 16 if "googlenet" in name else 8)
    plan = deploy_net(proto, None, {}, shape)
    if outputs is not None:
        assert plan.outputs == outputs
    assert all(not t.startswith("label") and "sim" not in t for t in plan.inputs), plan.inputs
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval()
    export_plan(net, plan)


@pytest.mark.parametrize("name", ["lenet_b64.prototxt", "thesis_mnist_egomotion_b125.prototxt",
                                  "thesis_kitti_egomotion_b16.prototxt"])
def test_timing_nets_parity(name):
    if not TIMING.is_dir():
        pytest.skip("timing prototxts absent")
    proto = filter_net(read_net(TIMING / name), net_state("TEST"))
    plan = deploy_net(proto, None, {}, None)
    # Labels go with the losses; the batch is small for speed (it is dynamic in the graph anyway).
    assert not any(n.startswith("label") for n in plan.inputs)
    plan = deploy_net(proto, None, {n: (2, *plan.input_shapes[n][1:]) for n in plan.inputs})
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval()
    if "kitti" in name:
        assert plan.inputs == ["data", "data_p"] and plan.outputs == ["fcx", "fcy", "fcz"]
        assert net.blob_shapes["conv5"] == (2, 256, 13, 13) and net.blob_shapes["conv7"] == (2, 128, 2, 2)
    if "mnist_egomotion" in name:
        assert net.blob_shapes["pool2"] == (2, 256, 1, 1)  # 28 -> 5 -> 2 -> 2 -> 1: exists only with ceil
    export_plan(net, plan)


# -- the real LeNet, through the CLI --------------------------------------------------------------

def mnist_test_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from data_prep.idx import read_idx

    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:n]
    return images.astype(np.float32)[:, None] * np.float32(0.00390625), labels.astype(np.int64)


def test_real_lenet_cli_export_classifies_mnist(tmp_path, capsys):
    if not LENET.is_dir() or not MNIST.is_dir():
        pytest.skip("real LeNet or MNIST absent")
    out = tmp_path / "lenet.onnx"
    rc = main(["export", "--model", str(LENET / "lenet.prototxt"), "--weights", str(LENET / "lenet_iter_10000.caffemodel"),
               "--outputs", "conv1,pool1,pool2,ip1,prob", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "dynamic batch" in printed and "max relative error" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx"]  # atomic: no temporary left over
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["conv1", "pool1", "pool2", "ip1", "prob"]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"

    images, labels = mnist_test_digits(300)
    session = ort_session(out)
    net, plan = build_deploy(LENET / "lenet.prototxt", [LENET / "lenet_iter_10000.caffemodel"],
                             ["conv1", "pool1", "pool2", "ip1", "prob"], {"data": (300, 1, 28, 28)})
    with torch.no_grad():
        blobs = net({"data": torch.from_numpy(images)})
    got = {}
    for start, stop in ((0, 7), (7, 300)):  # two batch sizes on one session
        for name, value in zip(plan.outputs, session.run(None, {"data": images[start:stop]}), strict=True):
            got.setdefault(name, []).append(value)
    for name in plan.outputs:
        value = np.concatenate(got[name])
        assert value.shape == net.blob_shapes[name]
        assert max_rel_error(value, blobs[name].numpy()) <= 1e-5, name
    accuracy = float(np.mean(np.concatenate(got["prob"]).argmax(1) == labels))
    assert accuracy >= 0.97  # the real model reaches 99.14 % on all of t10k


def test_train_val_becomes_deploy_and_records_its_transform():
    if not CONFORMANCE.is_dir():
        pytest.skip("conformance prototxts absent")
    proto = filter_net(read_net(CONFORMANCE / "01_lenet_train_test.prototxt"), net_state("TEST"))
    plan = deploy_net(proto, None, {"data": (3, 1, 28, 28)})
    assert plan.inputs == ["data"] and plan.outputs == ["ip2"]
    assert [lp.type for lp in plan.proto.layer][0] == "Input"
    assert {"loss", "accuracy"} <= set(plan.dropped)
    assert plan.transform is not None and plan.transform.scale == pytest.approx(0.00390625)
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval()
    model, _ = export_plan(net, plan)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["caffe.transform_param"].startswith("scale: 0.00390625")
    assert meta["caffe.outputs"] == "ip2"
    # chosen outputs keep only what they need: pool1 needs conv1 only
    plan = deploy_net(proto, ["pool1"], {"data": (3, 1, 28, 28)})
    assert [lp.name for lp in plan.proto.layer] == ["mnist", "conv1", "pool1"]


# -- Caffe's pooling shapes and WITHIN_CHANNEL LRN, checked by hand -------------------------------

POOL_NET = """
name: "pools"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 14 dim: 14 } } }
layer { name: "ceil" type: "Pooling" bottom: "x" top: "ceil" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "gap" type: "Pooling" bottom: "x" top: "gap" pooling_param { pool: MAX kernel_size: 1 stride: 4 } }
layer { name: "ave" type: "Pooling" bottom: "x" top: "ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "lrn" type: "LRN" bottom: "x" top: "lrn"
        lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 k: 7 } }
"""


def test_pooling_shapes_and_within_channel_lrn_by_hand():
    proto = parse_net(POOL_NET)
    net, plan = _build(proto, ["ceil", "gap", "ave", "lrn"])
    model, _ = export_plan(net, plan)
    assert "LRN" not in {n.op_type for n in model.graph.node}  # the composition, not ONNX's ACROSS LRN
    x = np.random.default_rng(0).standard_normal((5, 3, 14, 14)).astype(np.float32)
    ceil, gap, ave, lrn = ort_session(model).run(None, {"x": x})
    # ceil((14-3)/2)+1 = 7 (floor: 6): the last window covers rows 12..13 only
    assert ceil.shape == (5, 3, 7, 7)
    np.testing.assert_array_equal(ceil[..., 6, 6], x[..., 12:14, 12:14].max(axis=(-1, -2)))
    # pad 0, k1 s4: ceil(13/4)+1 = 5 windows at 0,4,8,12,16 (no clip without pad): 16 is empty -> -FLT_MAX
    assert gap.shape == (5, 3, 5, 5)
    np.testing.assert_array_equal(gap[..., :4, :4], x[..., ::4, ::4][..., :4, :4])
    assert np.all(gap[..., 4, :] == -np.finfo(np.float32).max)
    # AVE pad 1: ceil((14+2-3)/2)+1 = 8, last start 13 < 14+1 kept; divisor counts padding, not overhang
    assert ave.shape == (5, 3, 8, 8)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(ave[..., 0, 0], padded[..., 0:3, 0:3].sum((-1, -2)) / 9, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ave[..., 7, 7], padded[..., 14:16, 14:16].sum((-1, -2)) / 4, rtol=1e-5, atol=1e-6)
    # WITHIN_CHANNEL: x * (1 + alpha * mean_{3x3, zero pad, /9}(x^2))^-beta, k ignored
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    window = sum(sq[..., i:i + 14, j:j + 14] for i in range(3) for j in range(3)) / 9
    np.testing.assert_allclose(lrn, x * (1 + 0.5 * window) ** -0.75, rtol=1e-5, atol=1e-6)


ACROSS_NET = """
name: "across"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 6 } } }
layer { name: "few" type: "LRN" bottom: "x" top: "few" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
"""


@pytest.mark.parametrize("channels", [3, 9])
def test_across_channels_lrn_export_by_hand(channels):
    """The traced ACROSS_CHANNELS form (an average pool over the channel axis, exp/log power) is Caffe's formula,
    also with fewer channels than local_size (the window is clipped: missing channels add nothing)."""
    proto = parse_net(ACROSS_NET.replace("dim: 3", f"dim: {channels}"))
    net, plan = _build(proto, ["few"])
    model, _ = export_plan(net, plan)
    x = np.random.default_rng(1).standard_normal((4, channels, 5, 6)).astype(np.float32) * 3
    (y,) = ort_session(model).run(None, {"x": x})
    sq = x.astype(np.float64) ** 2
    window = np.stack([sq[:, max(0, c - 2):c + 3].sum(1) for c in range(channels)], axis=1)
    np.testing.assert_allclose(y, x * (2 + 0.5 / 5 * window) ** -0.75, rtol=2e-6, atol=1e-7)


def test_max_rel_error_rules():
    e = np.array([1.0, -2.0, -np.finfo(np.float32).max, np.nan], np.float32)
    assert max_rel_error(e, e) == 0
    assert max_rel_error(e + np.array([0, 2e-5, 0, 0], np.float32), e) == pytest.approx(1e-5, rel=1e-2)
    assert math.isinf(max_rel_error(np.array([1, -2, 0, np.nan], np.float32), e))  # sentinel lost
    assert math.isinf(max_rel_error(e[:2], e))


# -- CLI errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--outputs", "nope"], "'nope' is not a blob"),
    (["--outputs", "data"], "is an input"),
    (["--input-shape", "2,x,3"], "--input-shape"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    if not LENET.is_dir():
        pytest.skip("real LeNet absent")
    rc = main(["export", "--model", str(LENET / "lenet.prototxt"), "-o", str(tmp_path / "x.onnx"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_data_layer_without_shape_asks_for_input_shape(tmp_path, capsys):
    if not CONFORMANCE.is_dir():
        pytest.skip("conformance prototxts absent")
    rc = main(["export", "--model", str(CONFORMANCE / "01_lenet_train_test.prototxt"), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "--input-shape" in err


def test_outputs_carry_caffe_shapes_not_tracer_names(tmp_path):
    """Each output's dims: the symbolic batch, then the blob's fixed extents (the tracer names them
    'Mulnorm1_dim_1' and the like)."""
    bcnn = Path(__file__).resolve().parents[1] / "prototxt" / "kitti" / "bcnn_deploy.prototxt"
    net, plan = build_deploy(bcnn, [], ["norm1", "conv3", "pool5"])
    model, _ = export_model(net, plan, tmp_path / "m.onnx")
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims == {"norm1": ["batch", 96, 27, 27], "conv3": ["batch", 384, 13, 13], "pool5": ["batch", 256, 6, 6]}
