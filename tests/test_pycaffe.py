"""``import caffe``: pycaffe's API on our core, pinned to BVLC Caffe's golden outputs and to ``egomotion train``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converter.io import filter_net, net_state, read_net, read_solver, write_message
from converter.net import CaffeNet
from tests import golden
from tests.golden import BWD_ATOL, BWD_RTOL, FWD_ATOL, FWD_RTOL, GOLDEN, assert_close, file_name, require_golden

caffe = pytest.importorskip("caffe")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", golden.LAYER_CASES)
def test_net_forward_backward_is_caffes_on_every_golden_layer_case(case, monkeypatch):
    require_golden()
    folder = GOLDEN / case
    monkeypatch.chdir(folder)
    for run in golden.oracle_runs(folder):
        phase = caffe.TRAIN if run["phase"] == "TRAIN" else caffe.TEST
        net = caffe.Net(run["model"], run["weights"], phase)
        inputs = {k: np.load(p) for k, p in run["inputs"].items()}
        if any(net.blobs[k].data.shape != v.shape for k, v in inputs.items()):
            for k, v in inputs.items():
                net.blobs[k].reshape(*v.shape)
            net.reshape()
        out = net.forward(**inputs)
        assert set(out) == set(net.outputs)
        for name, blob in net.blobs.items():
            path = folder / "blobs" / f"{file_name(name)}.npy"
            if path.exists():
                assert_close(blob.data, np.load(path), f"{case}: blob {name}", FWD_RTOL, FWD_ATOL)
        if not run["backward"]:
            continue
        diffs = {k: np.load(p) for k, p in run["top_diffs"].items()}
        net.backward(**diffs)
        compared = 0
        for name, blob in net.blobs.items():
            path = folder / "diffs" / f"{file_name(name)}.npy"
            if path.exists():
                assert_close(blob.diff, np.load(path), f"{case}: diff {name}", BWD_RTOL, BWD_ATOL)
                compared += 1
        for layer, blobs in net.params.items():
            for i, blob in enumerate(blobs):
                path = folder / "param_diffs" / f"{file_name(layer)}.{i}.npy"
                if path.exists():
                    assert_close(blob.diff, np.load(path).reshape(blob.diff.shape), f"{case}: {layer}.{i}",
                                 BWD_RTOL, BWD_ATOL)
                    compared += 1
        assert compared, f"{case}: nothing compared after backward"


def test_params_write_through_and_save_loads_back(tmp_path):
    require_golden()
    net = caffe.Net(str(GOLDEN / "ip" / "net.prototxt"), caffe.TEST)
    layer = next(iter(net.params))
    net.params[layer][0].data[...] = 0.25
    assert float(net._net.params[0].detach().flatten()[0]) == 0.25  # the module sees the write
    net.save(str(tmp_path / "w"))  # a weights file is binary whatever its name (Caffe's CopyTrainedLayersFrom)
    other = caffe.Net(str(GOLDEN / "ip" / "net.prototxt"), str(tmp_path / "w"), caffe.TEST)
    np.testing.assert_array_equal(other.params[layer][0].data, net.params[layer][0].data)
    assert net._layer_names == list(net.layer_dict) and net.layers[0].type == net.layer_dict[net._layer_names[0]].type


@pytest.mark.parametrize("case", ["sgd_inv", "adam"])
def test_solver_step_is_egomotion_train(case, tmp_path, monkeypatch):
    """solver.step(1) N times gives the losses `egomotion train` gives and Caffe's (its case tolerance);
    solver.net.blobs['loss'] holds each iteration's loss. Same solver, same data, same seeds: the two agree to
    the last float32 bit for most of the run; where they part it is by one unit in the last place (the
    matrix kernels' blocking follows where the allocator put the buffers, which the step-by-step caller's
    kept blobs change), hence 1e-6 and not equality."""
    from runner.train import TrainOptions, run

    folder = GOLDEN / case
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    monkeypatch.chdir(folder)
    torch.set_num_threads(1)
    sp = read_solver("solver.prototxt")
    sp.net = str(folder / sp.net)
    sp.snapshot_prefix = str(tmp_path / "final")
    sp.snapshot_after_train = False
    write_message(tmp_path / "solver.prototxt", sp)
    init = "init.caffemodel" if (folder / "init.caffemodel").exists() else "../_data/lenet_init.caffemodel"
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.net.copy_from(init)
    losses = []
    for _ in range(sp.max_iter - 2):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    solver.step(2)  # several iterations in one call (the smoothed-loss ring restarts per call, as Caffe's)
    losses.append(float("nan"))
    losses.append(float(solver.net.blobs["loss"].data))
    assert solver.iter == sp.max_iter
    reference = run(sp, str(tmp_path / "solver.prototxt"),
                    TrainOptions(weights=[init], log=str(tmp_path / "log"), progress=False))
    by_iter = {r.iter: r.loss for r in reference.records}
    expected = [by_iter[i] for i in range(sp.max_iter)]
    expected[-2] = float("nan")
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert losses[:20] == [by_iter[i] for i in range(20)]
    caffe_losses = [float(line.split("\t")[1]) for line in (folder / "losses.tsv").read_text().splitlines()[1:]]
    caffe_losses[sp.max_iter - 2] = float("nan")
    np.testing.assert_allclose(losses, caffe_losses[:sp.max_iter], rtol=1e-4)
    with pytest.raises(Exception, match="NesterovSolver for a solver of type"):
        sp.type = "Adam"
        write_message(tmp_path / "adam.prototxt", sp)
        caffe.NesterovSolver(str(tmp_path / "adam.prototxt"))


def test_netspec_writes_the_thesis_classifier():
    """The thesis's classifier as its scripts wrote it (NetSpec, in-place ReLU/Dropout, frozen convolutions by
    param, ntop=2): the same layers as prototxt/mnist/classifier_train_val.prototxt (TRAIN), built alike."""
    from caffe import layers as L
    from caffe import params as P

    frozen = [dict(lr_mult=0, decay_mult=0)] * 2
    learn = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    n = caffe.NetSpec()
    n.digits, n.label = L.Data(source="x", batch_size=125, backend=P.Data.LMDB, ntop=2,
                               transform_param=dict(scale=0.00392156862745098))
    n.conv1 = L.Convolution(n.digits, num_output=96, kernel_size=11, stride=4, param=frozen,
                            weight_filler=dict(type="gaussian", std=0.01), bias_filler=dict(type="constant", value=0.1))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=0.0001, beta=0.75)
    n.conv2 = L.Convolution(n.norm1, num_output=256, kernel_size=5, pad=2, group=2, param=frozen,
                            weight_filler=dict(type="gaussian", std=0.01), bias_filler=dict(type="constant", value=0.1))
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm2 = L.LRN(n.pool2, local_size=5, alpha=0.0001, beta=0.75)
    n.fc500 = L.InnerProduct(n.norm2, num_output=500, param=learn,
                             weight_filler=dict(type="gaussian", std=0.005), bias_filler=dict(type="constant", value=0.1))
    n.relu3 = L.ReLU(n.fc500, in_place=True)
    n.drop3 = L.Dropout(n.relu3, dropout_ratio=0.5, in_place=True)
    n.fc10 = L.InnerProduct(n.drop3, num_output=10, param=learn,
                            weight_filler=dict(type="gaussian", std=0.005), bias_filler=dict(type="constant", value=0.1))
    n.loss = L.SoftmaxWithLoss(n.fc10, n.label)
    ours = n.to_proto()
    theirs = filter_net(read_net(ROOT / "prototxt" / "mnist" / "classifier_train_val.prototxt"), net_state("TRAIN"))
    ours.layer[0].data_param.source = theirs.layer[0].data_param.source
    for lp in theirs.layer:
        lp.ClearField("include")
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in ours.layer] == \
        [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in theirs.layer]
    for a, b in zip(ours.layer, theirs.layer, strict=True):
        assert a == b, a.name
    shapes = {"digits": (2, 1, 28, 28), "label": (2,)}
    built = [CaffeNet(p, shapes, torch.Generator().manual_seed(1)) for p in (ours, theirs)]
    for p, q in zip(built[0].params, built[1].params, strict=True):
        assert torch.equal(p, q)


def test_netspec_shares_params_by_name_and_names_layers_like_pycaffe():
    from caffe import layers as L

    n = caffe.NetSpec()
    n.a = L.Input(shape=dict(dim=[1, 3]))
    n.b = L.Input(shape=dict(dim=[1, 3]))
    shared = [dict(name="w"), dict(name="bias")]
    n.fa = L.InnerProduct(n.a, num_output=2, param=shared)
    n.fb = L.InnerProduct(n.b, num_output=2, param=shared)
    n.loss = L.EuclideanLoss(n.fa, n.fb)
    proto = n.to_proto()
    assert [lp.name for lp in proto.layer] == ["a", "b", "fa", "fb", "loss"]
    net = CaffeNet(proto)
    assert len(net.params) == 2  # one weight and one bias, shared by both towers
    unnamed = caffe.to_proto(L.ReLU(L.Input(shape=dict(dim=[1])), in_place=True))
    assert [(lp.name, list(lp.top)) for lp in unnamed.layer] == [("Input1", ["Input1"]), ("ReLU1", ["Input1"])]


def test_module_switches_and_schema():
    import caffe.proto.caffe_pb2 as pb

    from converter import caffe_pb2

    assert pb is caffe_pb2 and caffe.proto.caffe_pb2 is caffe_pb2 and (caffe.TRAIN, caffe.TEST) == (0, 1)
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, data=[0.0] * 6)
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 1, 2, 3)
    shaped = caffe_pb2.BlobProto(data=[0.0] * 6)
    shaped.shape.dim.extend([2, 3])
    assert caffe.io.blobproto_to_array(shaped).shape == (2, 3)
    with pytest.raises(ValueError):  # several values and no shape
        caffe.io.blobproto_to_array(caffe_pb2.BlobProto(data=[0.0] * 6))
    assert caffe.io.blobproto_to_array(caffe_pb2.BlobProto(data=[123.0])) == 123  # one value: a scalar
    assert "Convolution" in caffe.layer_type_list() and "ContrastiveLoss" in caffe.layer_type_list()
    caffe.set_mode_cpu()
    caffe.set_random_seed(3)
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="no CUDA"):
            caffe.set_mode_gpu()
    datum = caffe.io.array_to_datum(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), label=7)
    assert datum.label == 7 and (caffe.io.datum_to_array(datum) == np.arange(24).reshape(2, 3, 4)).all()
    arrays = [np.ones((2, 3), np.float32), np.zeros((1, 1, 2, 2), np.float32)]
    back = caffe.io.blobprotovector_str_to_arraylist(caffe.io.arraylist_to_blobprotovector_str(arrays))
    assert [a.shape for a in back] == [(2, 3), (1, 1, 2, 2)]


def test_net_forward_reads_data_layers_like_caffe(monkeypatch):
    """caffe.Net.forward() with Data layers reads their sources and transforms as Caffe: the golden
    transformer case's blobs, bit for bit; a second forward reads the next batch (here: the LMDB wraps)."""
    require_golden()
    folder = GOLDEN / "transformer"
    monkeypatch.chdir(folder)
    net = caffe.Net("net.prototxt", caffe.TEST)
    net.forward()
    for path in sorted((folder / "blobs").glob("*.npy")):
        np.testing.assert_array_equal(net.blobs[path.stem].data, np.load(path), err_msg=path.name)


PY_LAYER = '''
import numpy as np
import caffe


class Scale(caffe.Layer):
    """top = k * bottom, k from param_str; its backward by hand."""

    def setup(self, bottom, top):
        self.k = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * top[0].diff
'''

PY_NET = '''
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 4
        weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "py" type: "Python" bottom: "ip" top: "scaled" python_param { module: "scale_layer" layer: "Scale"
        param_str: "3" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "scaled" bottom: "t" top: "loss" }
'''


def test_python_layers_run_in_pycaffe_and_with_the_flag(tmp_path, monkeypatch, capsys):
    """A caffe.Layer subclass named by python_param: forward and the user's backward (gradients by hand),
    built by caffe.Net; on the command line refused without --allow-python-layers, run with it."""
    from runner.cli import main

    (tmp_path / "scale_layer.py").write_text(PY_LAYER)
    (tmp_path / "net.prototxt").write_text(PY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    net.forward(x=x, t=t)
    w, b = net.params["ip"][0].data.astype(np.float64), net.params["ip"][1].data.astype(np.float64)
    ip = x @ w.T + b
    np.testing.assert_allclose(net.blobs["scaled"].data, 3 * ip, rtol=1e-6)
    loss = ((3 * ip - t) ** 2).sum() / 2 / 2  # Euclidean: sum of squares / (2 N)
    assert float(net.blobs["loss"].data) == pytest.approx(loss, rel=1e-6)
    net.backward()
    d_scaled = (3 * ip - t) / 2
    np.testing.assert_allclose(net.params["ip"][0].diff, (3 * d_scaled).T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["x"].diff, (3 * d_scaled) @ w, rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    argv = ["forward", "--model", str(tmp_path / "net.prototxt"), "--input", f"x={tmp_path / 'x.npy'}",
            "--input", f"t={tmp_path / 't.npy'}", "--dump", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "Python layers run arbitrary code and are refused" in capsys.readouterr().err
    assert main(["forward", "--allow-python-layers", *argv[1:]]) == 0
    assert np.load(tmp_path / "out" / "scaled.npy").shape == (2, 4)


def test_transformer_order_and_oversample_by_hand():
    t = caffe.io.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    img = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 12  # H×W×K, RGB
    out = t.preprocess("data", img)
    expected = (img.transpose(2, 0, 1)[[2, 1, 0]] * 255 - np.array([10, 20, 30])[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(t.deprocess("data", out), img, rtol=1e-5, atol=1e-6)
    images = [np.arange(16, dtype=np.float32).reshape(4, 4, 1)]
    crops = caffe.io.oversample(images, (2, 2))
    assert crops.shape == (10, 2, 2, 1)
    np.testing.assert_array_equal(crops[0, :, :, 0], [[0, 1], [4, 5]])  # top-left
    np.testing.assert_array_equal(crops[3, :, :, 0], [[10, 11], [14, 15]])  # bottom-right
    np.testing.assert_array_equal(crops[4, :, :, 0], [[5, 6], [9, 10]])  # centre
    np.testing.assert_array_equal(crops[5, :, :, 0], [[1, 0], [5, 4]])  # top-left, mirrored


LENET = ROOT.parent / "shared" / "data" / "caffe_models" / "lenet_mnist"
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def test_classifier_on_the_trained_lenet():
    """caffe.Classifier with the trained LeNet on real test digits: its centre-crop prediction is the net's
    own forward, and the digits are read correctly (>= 95 of 100)."""
    if not LENET.is_dir() or not MNIST.is_dir():
        pytest.skip("the trained LeNet or MNIST is absent")
    from data_prep.idx import read_idx

    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:100].astype(np.float32) / 255  # LeNet's scale
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:100]
    clf = caffe.Classifier(str(LENET / "lenet.prototxt"), str(LENET / "lenet_iter_10000.caffemodel"))
    scores = clf.predict([im[:, :, None] for im in images], oversample=False)
    assert scores.shape == (100, 10)
    assert (scores.argmax(1) == labels).sum() >= 95
    net = caffe.Net(str(LENET / "lenet.prototxt"), str(LENET / "lenet_iter_10000.caffemodel"), caffe.TEST)
    direct = net.forward_all(data=images[:, None])[net.outputs[0]]
    np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)


DUMMY_NET = """name: 'n' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 }
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 3 kernel_size: 2 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: -1 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss'
  include { min_level: 1 } }
"""


def test_partial_forward_backward_names_and_clearing(tmp_path):
    """forward(start, end) and backward(start, end) run only those layers on the blobs as they are (checked
    by hand for the InnerProduct); clear_param_diffs zeroes the diffs in place; names and levels as pycaffe."""
    (tmp_path / "n.prototxt").write_text(DUMMY_NET)
    net = caffe.Net(str(tmp_path / "n.prototxt"), caffe.TRAIN, level=1)
    assert list(net.top_names.items()) == [("data", ["data", "label"]), ("conv", ["conv"]), ("ip", ["ip_blob"]),
                                           ("loss", ["loss"])]
    assert net.bottom_names["loss"] == ["ip_blob", "label"] and net.outputs == ["loss"] and net.inputs == []
    rng = np.random.default_rng(0)
    conv = rng.uniform(size=net.blobs["conv"].data.shape).astype(np.float32)
    net.blobs["conv"].data[...] = conv
    out = net.forward(start="ip", end="ip")
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(out["ip_blob"], conv.reshape(4, -1) @ w.T + b, rtol=1e-5, atol=1e-5)
    top_diff = rng.uniform(size=(4, 5)).astype(np.float32)
    net.blobs["ip_blob"].diff[...] = top_diff
    back = net.backward(start="ip", end="ip")
    np.testing.assert_allclose(back["conv"], (top_diff @ w).reshape(conv.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][0].diff, top_diff.T @ conv.reshape(4, -1), rtol=1e-5, atol=1e-6)
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff
    assert np.abs(diff).max() > 0
    net.clear_param_diffs()
    assert (diff == 0).all()  # the same array, zeroed in place
    level0 = caffe.Net(str(tmp_path / "n.prototxt"), caffe.TEST)
    assert "loss" not in level0.blobs and level0.outputs == ["ip_blob", "label"]


def test_backward_without_forward_and_reshape_on_forward(tmp_path, monkeypatch):
    """As pycaffe: backward() uses the diffs in memory even before any forward (here 3·3·d through two user
    layers), and an input blob reshaped by the script makes forward() reshape every layer."""
    (tmp_path / "scale_layer.py").write_text(PY_LAYER)
    (tmp_path / "two.prototxt").write_text(
        "input: 'data' input_shape { dim: 2 dim: 3 }\n"
        "layer { type: 'Python' name: 'a' bottom: 'data' top: 'a' python_param { module: 'scale_layer' "
        "layer: 'Scale' param_str: '3' } }\n"
        "layer { type: 'Python' name: 'b' bottom: 'a' top: 'b' python_param { module: 'scale_layer' "
        "layer: 'Scale' param_str: '3' } }\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = caffe.Net(str(tmp_path / "two.prototxt"), caffe.TRAIN)
    net.blobs["b"].diff[...] = 7
    net.backward()
    assert (net.blobs["data"].diff == 63).all()
    net.blobs["data"].reshape(4, 5)
    net.blobs["data"].data[...] = 2
    net.forward()
    assert net.blobs["b"].data.shape == (4, 5) and (net.blobs["b"].data == 18).all()


def test_coord_map_and_crop_align_a_fully_convolutional_net():
    """conv 3×3 (pad 0) → pool 4 → deconv 8 (stride 4) shifts by one pixel against the input (by hand:
    (0 − 1)/1 for the conv, then 1/4·(…) through the pool, ×4 back through the deconv); crop() emits the Crop
    that our net then builds to exactly the input's 100×100."""
    from caffe import layers as L
    from caffe import params as P
    from caffe.coord_map import coord_map_from_to, crop

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, stride=1, pad=0)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=4, stride=4)
    n.up = L.Deconvolution(n.pool, num_output=2, kernel_size=8, stride=4)
    ax, a, b = coord_map_from_to(n.up, n.data)
    assert ax == 1 and a.tolist() == [1.0] and b.tolist() == [-1.0]
    n.aligned = crop(n.up, n.data)
    proto = n.to_proto()
    assert proto.layer[-1].crop_param.axis == 2 and list(proto.layer[-1].crop_param.offset) == [1]
    assert CaffeNet(proto).blob_shapes["aligned"] == (1, 2, 100, 100)
    n.ip = L.InnerProduct(n.up, num_output=2)
    with pytest.raises(RuntimeError, match="Could not compute map"):
        coord_map_from_to(n.ip, n.data)


LEARNED_LAYER = '''
import numpy as np
import caffe


class Gain(caffe.Layer):
    """top = w * bottom with a learnable w (its own blob, initial 2)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 2

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = (top[0].diff * bottom[0].data).sum()
        bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff
'''


def test_python_layer_blobs_are_net_parameters(tmp_path, monkeypatch):
    """A Python layer's own blobs (self.blobs.add_blob) are parameters of the net: their diffs come from the
    user's backward (by hand), they are saved in and restored from a .caffemodel."""
    (tmp_path / "gain_layer.py").write_text(LEARNED_LAYER)
    (tmp_path / "g.prototxt").write_text(
        "input: 'x' input_shape { dim: 3 }\n"
        "layer { type: 'Python' name: 'g' bottom: 'x' top: 'y' python_param { module: 'gain_layer' layer: 'Gain' } }\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = caffe.Net(str(tmp_path / "g.prototxt"), caffe.TRAIN)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(net.forward(x=x)["y"], 2 * x)
    net.blobs["y"].diff[...] = [1.0, 0.5, -1.0]
    net.backward()
    assert float(net.params["g"][0].diff[0]) == 1 * 1 + 2 * 0.5 - 3  # sum(dy * x)
    np.testing.assert_array_equal(net.blobs["x"].diff, 2 * np.array([1.0, 0.5, -1.0]))
    net.params["g"][0].data[0] = 5
    net.save(str(tmp_path / "g.caffemodel"))
    other = caffe.Net(str(tmp_path / "g.prototxt"), str(tmp_path / "g.caffemodel"), caffe.TRAIN)
    np.testing.assert_array_equal(other.forward(x=x)["y"], 5 * x)


def test_detector_scores_windows_of_an_image(tmp_path):
    """caffe.Detector with the trained LeNet: two real test digits side by side in one image, a window on
    each; each window's prediction is the net's own on that digit (and reads it), with and without context."""
    if not LENET.is_dir() or not MNIST.is_dir():
        pytest.skip("the trained LeNet or MNIST is absent")
    import cv2

    from data_prep.idx import read_idx

    digits = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:2]
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:2]
    canvas = np.concatenate(list(digits), axis=1)  # 28 × 56, grey
    cv2.imwrite(str(tmp_path / "two.png"), canvas)
    # load_image gives RGB in [0, 1]; LeNet takes one channel: the swap keeps the first
    det = caffe.Detector(str(LENET / "lenet.prototxt"), str(LENET / "lenet_iter_10000.caffemodel"),
                         channel_swap=(0,))
    windows = [np.array([0, 0, 28, 28]), np.array([0, 28, 28, 56])]
    found = det.detect_windows([(str(tmp_path / "two.png"), windows)])
    assert [d["filename"] for d in found] == [str(tmp_path / "two.png")] * 2
    net = caffe.Net(str(LENET / "lenet.prototxt"), str(LENET / "lenet_iter_10000.caffemodel"), caffe.TEST)
    direct = net.forward_all(data=digits[:, None].astype(np.float32) / 255)[net.outputs[0]]
    for d, expected, label in zip(found, direct, labels, strict=True):
        np.testing.assert_allclose(d["prediction"], expected, rtol=1e-5, atol=1e-6)
        assert d["prediction"].argmax() == label
    padded = caffe.Detector(str(LENET / "lenet.prototxt"), str(LENET / "lenet_iter_10000.caffemodel"),
                            context_pad=2)
    crop = padded.crop(np.ones((28, 56, 1), np.float32), np.array([0, 0, 27, 27]))
    assert crop.shape == (28, 28, 1)
    # 2 of 28 input pixels are context on each side; left of and above the image there is none: the mean (0)
    assert (crop[:2, :, 0] == 0).all() and (crop[:, :2, 0] == 0).all() and (crop[4:26, 4:26, 0] == 1).all()


def test_hdf5_weights_in_caffes_layout(tmp_path):
    """save_hdf5 writes Caffe's layout (data/<layer>/<i>, diff/<layer>/<i>); load_hdf5 restores the weights."""
    import h5py

    require_golden()
    net = caffe.Net(str(GOLDEN / "ip" / "net.prototxt"), caffe.TEST)
    layer = next(iter(net.params))
    net.params[layer][0].data[...] = 0.5
    net.save_hdf5(str(tmp_path / "w.h5"))
    with h5py.File(tmp_path / "w.h5") as f:
        assert set(f) == {"data", "diff"} and f[f"data/{layer}/0"].shape == net.params[layer][0].data.shape
        assert (f[f"data/{layer}/0"][()] == 0.5).all()
    other = caffe.Net(str(GOLDEN / "ip" / "net.prototxt"), caffe.TEST)
    other.load_hdf5(str(tmp_path / "w.h5"))
    np.testing.assert_array_equal(other.params[layer][0].data, net.params[layer][0].data)


LABELLED = """name: 'l' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'x' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: 'constant' value: 1 } data_filler { type: 'constant' } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'x' top: 'ip'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""


def _hand_loss(w: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    z = np.ones((4, 3)) @ w.astype(np.float64).T + b
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(4), labels.astype(int)].mean())


def test_a_script_sets_dummydata_labels_for_nets_and_solvers(tmp_path):
    """As in Caffe, a constant DummyData top is filled once and never refilled: labels a script writes into
    the blob are what the net (and a solver's every step) uses; the loss by hand from those labels."""
    (tmp_path / "l.prototxt").write_text(LABELLED)
    labels = np.array([0, 3, 4, 1], np.float32)
    net = caffe.Net(str(tmp_path / "l.prototxt"), caffe.TRAIN)
    net.blobs["label"].data[...] = labels
    net.forward()
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    assert float(net.blobs["loss"].data) == pytest.approx(_hand_loss(w, b, labels), rel=1e-5)
    (tmp_path / "s.prototxt").write_text(f'net: "{tmp_path / "l.prototxt"}" base_lr: 0.1 lr_policy: "fixed" '
                                         f'max_iter: 5 snapshot_prefix: "{tmp_path / "snap"}"\n')
    solver = caffe.SGDSolver(str(tmp_path / "s.prototxt"))
    solver.net.blobs["label"].data[...] = labels
    w0, b0 = solver.net.params["ip"][0].data.copy(), solver.net.params["ip"][1].data.copy()
    solver.step(1)
    assert float(solver.net.blobs["loss"].data) == pytest.approx(_hand_loss(w0, b0, labels), rel=1e-5)
    np.testing.assert_array_equal(solver.net.blobs["label"].data, labels)


def test_memory_data_share_with_and_forward_backward_all(tmp_path):
    """set_input_arrays feeds a MemoryData layer batch after batch (wrapping); share_with makes a net use
    another's weights; forward_backward_all returns the outputs and the input diffs."""
    (tmp_path / "m.prototxt").write_text(
        "layer { type: 'MemoryData' name: 'mem' top: 'x' top: 'label' memory_data_param { batch_size: 2 "
        "channels: 1 height: 1 width: 3 } }\n"
        "layer { type: 'InnerProduct' name: 'ip' bottom: 'x' top: 'ip' inner_product_param { num_output: 2 "
        "weight_filler { type: 'gaussian' std: 1 } } }\n"
        "layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }\n")
    net = caffe.Net(str(tmp_path / "m.prototxt"), caffe.TRAIN)
    with pytest.raises(Exception, match="call set_input_arrays first"):
        net.forward()
    with pytest.raises(Exception, match="multiple of the batch size 2"):
        net.set_input_arrays(np.zeros((3, 1, 1, 3)), np.zeros(3))
    data = np.arange(12, dtype=np.float32).reshape(4, 1, 1, 3)
    net.set_input_arrays(data, np.array([0, 1, 1, 0], np.float32))
    for first in (0, 2, 0):  # batches of 2, wrapping after the fourth item
        net.forward()
        np.testing.assert_array_equal(net.blobs["x"].data, data[first:first + 2])
    other = caffe.Net(str(tmp_path / "m.prototxt"), caffe.TRAIN)
    other.share_with(net)
    net.params["ip"][0].data[...] = 0.25
    np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    (tmp_path / "i.prototxt").write_text(
        "input: 'x' input_shape { dim: 2 dim: 3 }\n"
        "layer { type: 'InnerProduct' name: 'ip' bottom: 'x' top: 'ip' inner_product_param { num_output: 2 "
        "weight_filler { type: 'gaussian' std: 1 } } }\n")
    plain = caffe.Net(str(tmp_path / "i.prototxt"), caffe.TRAIN)
    x = np.ones((2, 3), np.float32)
    plain.blobs["ip"].diff[...] = 1
    outs, diffs = plain.forward_backward_all(x=x)
    np.testing.assert_allclose(outs["ip"], x @ plain.params["ip"][0].data.T + plain.params["ip"][1].data, rtol=1e-6)
    np.testing.assert_allclose(diffs["x"], np.ones((2, 2)) @ plain.params["ip"][0].data, rtol=1e-6)


def test_solver_snapshot_restore_and_test_nets(tmp_path):
    """solver.snapshot() writes <prefix>_iter_N.caffemodel/.solverstate; a new solver restores iter and
    weights from the state; test_nets are the solver's TEST nets, sharing the trained weights."""
    (tmp_path / "l.prototxt").write_text(LABELLED)
    (tmp_path / "s.prototxt").write_text(f'net: "{tmp_path / "l.prototxt"}" base_lr: 0.1 lr_policy: "fixed" '
                                         f'test_iter: 1 test_interval: 100 max_iter: 10 '
                                         f'snapshot_prefix: "{tmp_path / "snap"}"\n')
    solver = caffe.get_solver(str(tmp_path / "s.prototxt"))
    assert len(solver.test_nets) == 1
    solver.step(3)
    np.testing.assert_array_equal(solver.test_nets[0].params["ip"][0].data, solver.net.params["ip"][0].data)
    solver.snapshot()
    assert (tmp_path / "snap_iter_3.caffemodel").exists() and (tmp_path / "snap_iter_3.solverstate").exists()
    again = caffe.get_solver(str(tmp_path / "s.prototxt"))
    again.restore(str(tmp_path / "snap_iter_3.solverstate"))
    assert again.iter == 3
    np.testing.assert_array_equal(again.net.params["ip"][0].data, solver.net.params["ip"][0].data)


def test_netspec_writes_the_thesis_egomotion_net_as_its_scripts_did():
    """The thesis generated its siamese net with NetSpec: one tower function called twice with convolution
    params shared by name, Slice with ntop, in-place ReLU/Dropout, phase-specific data layers, a Silence with
    ntop=0. The TRAIN net it writes is prototxt/mnist/egomotion_train_val.prototxt's TRAIN net, layer for
    layer, and builds to the same parameters."""
    from caffe import layers as L
    from caffe import params as P

    def shared(name):
        return [dict(name=f"{name}_w", lr_mult=1, decay_mult=1), dict(name=f"{name}_b", lr_mult=2, decay_mult=0)]

    learn = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    gauss = dict(type="gaussian", std=0.01)
    bias = dict(type="constant", value=0.1)

    def tower(n, image, s=""):
        n[f"conv1{s}"] = L.Convolution(image, num_output=96, kernel_size=11, stride=4, param=shared("conv1"),
                                       weight_filler=gauss, bias_filler=bias)
        n[f"relu1{s}"] = L.ReLU(n[f"conv1{s}"], in_place=True)
        n[f"pool1{s}"] = L.Pooling(n[f"relu1{s}"], pool=P.Pooling.MAX, kernel_size=3, stride=2)
        n[f"norm1{s}"] = L.LRN(n[f"pool1{s}"], local_size=5, alpha=0.0001, beta=0.75)
        n[f"conv2{s}"] = L.Convolution(n[f"norm1{s}"], num_output=256, kernel_size=5, pad=2, group=2,
                                       param=shared("conv2"), weight_filler=gauss, bias_filler=bias)
        n[f"relu2{s}"] = L.ReLU(n[f"conv2{s}"], in_place=True)
        n[f"pool2{s}"] = L.Pooling(n[f"relu2{s}"], pool=P.Pooling.MAX, kernel_size=3, stride=2)
        n[f"norm2{s}"] = L.LRN(n[f"pool2{s}"], local_size=5, alpha=0.0001, beta=0.75)
        return n[f"norm2{s}"]

    n = caffe.NetSpec()
    train = dict(phase=caffe.TRAIN)
    n.pairs, n.sim = L.Data(source="data/mnist/pairs_train_lmdb", batch_size=125, backend=P.Data.LMDB, ntop=2,
                            transform_param=dict(scale=0.00392156862745098), include=train)
    n.motion = L.Data(source="data/mnist/pairs_train_labels_lmdb", batch_size=125, backend=P.Data.LMDB,
                      include=train)
    n.image0, n.image1 = L.Slice(n.pairs, name="slice_pairs", axis=1, slice_point=1, ntop=2)
    n.label_x, n.label_y, n.label_z = L.Slice(n.motion, name="slice_motion", axis=1, slice_point=[1, 2], ntop=3)
    n.silence_sim = L.Silence(n.sim, ntop=0)
    n.concat = L.Concat(tower(n, n.image0), tower(n, n.image1, "_p"), axis=1)
    fc = dict(type="gaussian", std=0.005)
    n.fc1000 = L.InnerProduct(n.concat, num_output=1000, param=learn, weight_filler=fc, bias_filler=bias)
    n.relu3 = L.ReLU(n.fc1000, in_place=True)
    n.drop3 = L.Dropout(n.relu3, dropout_ratio=0.5, in_place=True)
    for axis, classes in (("x", 7), ("y", 7), ("z", 20)):
        n[f"fc_{axis}"] = L.InnerProduct(n.drop3, num_output=classes, param=learn, weight_filler=fc,
                                         bias_filler=bias)
    for axis in "xyz":
        n[f"loss_{axis}"] = L.SoftmaxWithLoss(n[f"fc_{axis}"], n[f"label_{axis}"])
    ours = n.to_proto()
    theirs = filter_net(read_net(ROOT / "prototxt" / "mnist" / "egomotion_train_val.prototxt"), net_state("TRAIN"))
    assert [lp.name for lp in ours.layer] == [lp.name for lp in theirs.layer]
    for a, b in zip(ours.layer, theirs.layer, strict=True):
        assert a == b, a.name
    shapes = {"pairs": (2, 2, 28, 28), "sim": (2,), "motion": (2, 3)}
    built = [CaffeNet(p, shapes, torch.Generator().manual_seed(1)) for p in (ours, theirs)]
    assert len(built[0].params) == len(built[1].params)  # conv1/conv2 shared by name across the towers
    for p, q in zip(built[0].params, built[1].params, strict=True):
        assert torch.equal(p, q)
