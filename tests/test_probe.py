"""``egomotion probe`` on real images: export → ONNX Runtime features → probes → table.

Real data: ``../shared/data/sun_subset8`` (8 SUN397 classes, 10 train + 10 test each),
``../shared/data/imagenet_samples`` (one image of each of 100 ImageNet classes) and MNIST digits with the
real LeNet caffemodel (a trained net). For speed the KITTI BCNN tower is exported 16x narrower (same
kernels, strides, pads, groups, pooling and LRN) with seeded random weights, and probes run few
iterations with a small hidden layer.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net
from converter.net import CaffeNet
from runner.cli import main
from runner.deploy import deploy_net
from runner.export import export_model
from runner.ort import max_rel_error, ort_session
from runner.probe import Experiment, ProbeConfig, Result, extract, run, train_probe
from runner.probe_data import ImageSource, Sample, read_list, split, sun_class, sun_partition
from runner.report import THESIS_SUN, csv_text, markdown
from tests.golden import REFERENCE

DATA = REFERENCE.parent / "data"
SUN = DATA / "sun_subset8"
IMAGENET = DATA / "imagenet_samples"
LENET = DATA / "caffe_models" / "lenet_mnist"
BCNN = Path(__file__).resolve().parents[1] / "prototxt" / "kitti" / "bcnn_deploy.prototxt"
BLOBS = ["norm1", "norm2", "conv3", "conv4", "conv5"]
MEAN = [104.0, 117.0, 123.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} absent")


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """The BCNN tower, narrowed 16x, random (seeded) weights, exported with the probe blobs as outputs."""
    need(BCNN)
    proto = filter_net(read_net(BCNN), net_state("TEST"))
    for lp in proto.layer:
        if lp.type == "Convolution":
            p = lp.convolution_param
            p.num_output //= 16
            p.bias_filler.type, p.bias_filler.value = "constant", 0.1
    plan = deploy_net(proto, BLOBS + ["pool5"], {"data": (2, 3, 227, 227)})
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(1)).eval()
    path = tmp_path_factory.mktemp("tower") / "bcnn.onnx"
    export_model(net, plan, path)
    return path, net, plan


def sun_lists(tmp_path: Path) -> tuple[Path, Path]:
    need(SUN / "labels.tsv")
    rows = [line.split("\t") for line in (SUN / "labels.tsv").read_text().splitlines()[1:]]
    files = {}
    for split_name in ("train", "test"):
        files[split_name] = tmp_path / f"{split_name}.txt"
        files[split_name].write_text("".join(f"{r[0]} {r[3]}\n" for r in rows if r[1] == split_name))
    return files["train"], files["test"]


# -- the whole route on SUN ------------------------------------------------------------------------

def test_sun_features_probes_table(tower, tmp_path):
    path, _, _ = tower
    train_list, test_list = sun_lists(tmp_path)
    train, test = read_list(train_list, SUN), read_list(test_list, SUN)
    assert len(train) == len(test) == 80 and {s.label for s in train} == set(range(8))
    tp = caffe_pb2.TransformationParameter(mean_value=MEAN)
    config = ProbeConfig.named("thesis", iters=20, hidden=16, batch_size=40)
    exp = Experiment({"RANDOM": str(path)}, [(f"L{i + 1}", b) for i, b in enumerate(BLOBS)], [5],
                     [(train, test)] * 2, config, tp, seed=3, batch=32, device="cpu")
    results = run(exp)
    assert len(results) == 5 * 2 and exp.providers_used == {"RANDOM": "CPUExecutionProvider"}
    assert all(r.train_images == 40 and r.test_images == 80 for r in results)
    accuracies = np.array([r.accuracy for r in results])
    assert np.all((0 <= accuracies) & (accuracies <= 1))
    assert accuracies.mean() > 1 / 8 + 0.05  # random conv features still separate these scenes
    # Determinism under the seed: the same experiment gives the same numbers.
    again = run(Experiment({"RANDOM": str(path)}, [("L4", "conv4")], [5], [(train, test)] * 2,
                           config, tp, seed=3, batch=16, device="cpu"))
    by_key = {(r.layer, r.partition): r.accuracy for r in results}
    assert [r.accuracy for r in again] == [by_key[(r.layer, r.partition)] for r in again]

    text = markdown(results, "thesis")
    assert "| RANDOM |" in text and "5/class L5" in text and "KITTI-EGO | 2.93" in text
    rows = list(csv.DictReader(io.StringIO(csv_text(results))))
    ours = [r for r in rows if r["source"] == "ours"]
    assert len(ours) == 5 and {r["blob"] for r in ours} == set(BLOBS)
    assert len([r for r in rows if r["source"] == "thesis"]) == len(THESIS_SUN) * 2 * 5


def test_features_are_the_module_s_on_real_images(tower):
    """ORT features of real ImageNet images (one grayscale among them) equal the PyTorch module's,
    and the pixels are Caffe's: cv::resize bilinear to 227x227, BGR, minus the mean values."""
    need(IMAGENET / "labels_subset100.tsv")
    path, net, plan = tower
    refs = [str(IMAGENET / line.split("\t")[0])
            for line in (IMAGENET / "labels_subset100.tsv").read_text().splitlines()[1:]][:12]
    source = ImageSource(caffe_pb2.TransformationParameter(mean_value=MEAN), (3, 227, 227))
    x = source.batch(refs)
    img = cv2.resize(cv2.imread(refs[3], cv2.IMREAD_COLOR), (227, 227), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x[3], img.transpose(2, 0, 1).astype(np.float32) - np.float32(MEAN)[:, None, None])
    features = extract(ort_session(path), BLOBS, source, refs, batch=5)  # 5 + 5 + 2: three batch sizes
    with torch.no_grad():
        blobs = net({"data": torch.from_numpy(x[:2])})
    for name in BLOBS:
        assert features[name].shape == (12, int(np.prod(net.blob_shapes[name][1:])))
        assert max_rel_error(features[name][:2], blobs[name].reshape(2, -1).numpy()) <= 1e-5, name


# -- a trained net: LeNet on MNIST digits, through the CLI -----------------------------------------

def test_trained_lenet_probe_cli(tmp_path, capsys):
    need(LENET, DATA / "mnist")
    from data_prep.idx import read_idx

    onnx_path = tmp_path / "lenet.onnx"
    assert main(["export", "--model", str(LENET / "lenet.prototxt"), "--weights",
                 str(LENET / "lenet_iter_10000.caffemodel"), "--outputs", "pool1,ip1", "-o", str(onnx_path)]) == 0
    images = read_idx(DATA / "mnist" / "t10k-images-idx3-ubyte.gz")[:150]
    labels = read_idx(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")[:150]
    lines = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        lines.append(f"{i}.png {label}\n")
    (tmp_path / "digits.txt").write_text("".join(lines))
    out = tmp_path / "probe"
    rc = main(["probe", "--net", f"LENET={onnx_path}", "--probe", "linear", "--layers", "L1=pool1,L2=ip1",
               "--train-list", str(tmp_path / "digits.txt"), "--per-class", "5", "--splits", "2", "--iters", "40",
               "--batch-size", "50",
               "--lr", "0.01", "--scale", "0.00390625", "--device", "cpu", "--thesis-table", "none", "-o", str(out),
               "--threads", "2"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| LENET |" in printed
    assert "(CPUExecutionProvider; 2 intra-op thread(s) (--threads))" in printed
    assert json.loads((out / "results.json").read_text())["threads"] == "2 intra-op thread(s) (--threads)"
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.md", "probe.png", "results.json"]
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["layer"]: r for r in csv.DictReader((out / "probe.csv").open())}
    assert float(rows["L2"]["mean_accuracy"]) > 70  # chance is 10 %; trained ip1 features separate digits


def test_probe_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["probe", "--train-list", str(tmp_path / "x.txt"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--net" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "m.onnx").write_bytes(b"")
    rc = main(["probe", "--net", f"A={tmp_path / 'm.onnx'}", "-o", str(tmp_path / "o")])
    assert rc == 2 and "--train-list" in capsys.readouterr().err


# -- splits, lists, SUN partitions ------------------------------------------------------------------

def pool(classes: int, per: int) -> list[Sample]:
    return [Sample(f"c{c}/{i}.jpg", c) for c in range(classes) for i in range(per)]


def test_splits_are_n_per_class_seeded_and_differ_by_partition():
    train_pool = pool(4, 10)
    a, rest = split(train_pool, None, 3, seed=7, partition=0)
    assert sorted(s.label for s in a) == sorted([0, 1, 2, 3] * 3)
    assert not {s.ref for s in a} & {s.ref for s in rest} and len(rest) == 28
    assert split(train_pool, None, 3, 7, 0) == (a, rest)
    assert split(train_pool, None, 3, 7, 1)[0] != a and split(train_pool, None, 3, 8, 0)[0] != a
    _, test = split(train_pool, pool(4, 6), 2, 7, 0, test_per_class=5)
    assert len(test) == 20 and all(int(s.ref.split("/")[1][0]) < 5 for s in test)
    with pytest.raises(CaffeError, match="class 0 has 10 training images, 10 per class"):
        split(train_pool, None, 10, 0, 0)


def test_read_list_formats(tmp_path):
    f = tmp_path / "l.tsv"
    f.write_text("file\tsplit\tclass\tclass_index\na/x.jpg\ttrain\taquarium\t0\n\nb/y z.jpg\ttest\tdesert\t1\n")
    assert read_list(f) == [Sample(str(tmp_path / "a/x.jpg"), 0), Sample(str(tmp_path / "b/y z.jpg"), 1)]
    f.write_text("/abs/p.png 3\n# comment\nq.png 4\n")
    assert read_list(f, "/root") == [Sample("/abs/p.png", 3), Sample("/root/q.png", 4)]
    f.write_text("a.png 1\nb.png x\n")
    with pytest.raises(CaffeError, match=r"l.tsv:2: expected 'path label'"):
        read_list(f)


def test_sun_partition_files(tmp_path):
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Training_01.txt").write_text("/w/windmill/sun_a.jpg\n/a/abbey/sun_b.jpg\n")
    (tmp_path / "Partitions" / "Testing_01.txt").write_text("/b/bakery/shop/sun_c.jpg\n/a/abbey/sun_d.jpg\n")
    train, test, classes = sun_partition(tmp_path, 1)
    assert classes == ["abbey", "bakery/shop", "windmill"]
    assert train == [Sample(str(tmp_path / "w/windmill/sun_a.jpg"), 2), Sample(str(tmp_path / "a/abbey/sun_b.jpg"), 0)]
    assert [s.label for s in test] == [1, 0]
    assert sun_class("/b/bakery/shop/sun_c.jpg") == "bakery/shop"
    with pytest.raises(CaffeError, match="Training_02.txt"):
        sun_partition(tmp_path, 2)


# -- the probe solver is Caffe's SGD ------------------------------------------------------------------

def test_probe_sgd_step_is_caffe_s():
    """Two iterations by hand: v = m v + lr_mult lr (g + decay_mult wd w), w -= v; softmax loss / batch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    config = ProbeConfig.named("linear", iters=2, batch_size=4, dropout=0.0, base_lr=0.1, weight_decay=0.01)
    probe, losses = train_probe(torch.from_numpy(x), torch.from_numpy(y), 3, config, 0, seed=5)
    # the same initial weights: gaussian std 0.005 drawn from torch.Generator(seed), bias 1
    w = (torch.randn(3, 3, generator=torch.Generator().manual_seed(5)) * 0.005).double().numpy()
    b = np.ones(3)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    order = np.random.default_rng(5).permutation(4)
    for _ in range(2):
        xb, yb = x[order].astype(np.float64), y[order]
        z = xb @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = p.copy()
        d[np.arange(4), yb] -= 1
        d /= 4
        vw = 0.9 * vw + 0.1 * (d.T @ xb + 0.01 * w)
        vb = 0.9 * vb + 2 * 0.1 * d.sum(0)
        w, b = w - vw, b - vb
    np.testing.assert_allclose(probe.layers[0].weight.detach().numpy(), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probe.layers[0].bias.detach().numpy(), b, rtol=1e-5, atol=1e-7)
    assert len(losses) == 2


def test_probe_trains_with_a_solver_file(tmp_path):
    """`egomotion probe --solver FILE`: the file's rule and rates train the probe (here Nesterov, lr 0.2, no
    momentum history at the first step: w -= (1 + m) lr g), by hand in float64."""
    from converter.io import read_solver

    (tmp_path / "s.prototxt").write_text('type: "Nesterov" base_lr: 0.2 momentum: 0.5 lr_policy: "fixed" '
                                         "weight_decay: 0 max_iter: 1\n")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    config = ProbeConfig.named("linear", batch_size=4, dropout=0.0)
    config.solver_param = read_solver(tmp_path / "s.prototxt")
    probe, losses = train_probe(torch.from_numpy(x), torch.from_numpy(y), 3, config, 0, seed=5)
    w = (torch.randn(3, 3, generator=torch.Generator().manual_seed(5)) * 0.005).double().numpy()
    order = np.random.default_rng(5).permutation(4)
    xb, yb = x[order].astype(np.float64), y[order]
    z = xb @ w.T + 1
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), yb] -= 1
    w_expected = w - 1.5 * 0.2 * (p / 4).T @ xb  # Nesterov's first step: (1 + momentum) * lr * g
    np.testing.assert_allclose(probe.layers[0].weight.detach().numpy(), w_expected, rtol=1e-5, atol=1e-7)
    assert len(losses) == 1


def test_probe_definitions():
    thesis = ProbeConfig.named("thesis")
    assert (thesis.iters, thesis.base_lr, thesis.batch_size, thesis.hidden) == (10000, 0.001, 125, 1000)
    assert thesis.mlp_layers == ("L3", "L4", "L5") and thesis.schedule(397 * 5) == (10000, None)
    linear = ProbeConfig.named("linear")
    assert linear.mlp_layers == () and linear.dropout == 0.5
    assert linear.schedule(397 * 5) == (2 * 16 * 30, 16 * 30)  # ceil(1985/128) = 16 iterations an epoch
    with pytest.raises(CaffeError):
        ProbeConfig.named("svm")


def test_report_uses_every_partition():
    results = [Result("A", "L1", "norm1", 5, p, acc, acc, 40, 80, 0.1) for p, acc in enumerate([0.1, 0.3])]
    text = markdown(results, "linear", thesis="none")
    assert "| A | 20.00 ± 14.14 |" in text and "thesis" not in text


# -- the prototxt route: transfer nets take a KITTI snapshot's BCNN by layer name -------------------

TRANSFER = BCNN.parents[1] / "transfer"


def test_transfer_nets_take_the_kitti_bcnn_by_name(tmp_path):
    need(BCNN, TRANSFER)
    from converter.weights import load_weights, save_weights

    kitti = CaffeNet(filter_net(read_net(BCNN), net_state("TEST")), generator=torch.Generator().manual_seed(3))
    save_weights(kitti, tmp_path / "kitti.caffemodel")
    convs = [f"conv{i}" for i in range(1, 6)]

    def conv_weight(net, name):
        return net.params[net.blob_uses[net.layer_by_name(name)][0].learnable].detach()

    shapes = {"data": (1, 3, 227, 227), "label": (1,)}
    probe_net = TRANSFER / "sun397_probe_train_val.prototxt"
    for k in range(1, 6):
        proto = filter_net(read_net(probe_net), net_state("TRAIN", 0, [f"L{k}"]))
        names = [lp.name for lp in proto.layer]
        assert [c for c in convs if c in names] == convs[:k]  # layers above the probed one are left out
        assert (f"fc_prev_L{k}" in names) == (k >= 3) and (f"fc_L{k}" in names) == (k <= 2)
        if k not in (1, 5):  # building is the same for the others; keep the test fast
            continue
        net = CaffeNet(proto, shapes)
        load_weights(net, tmp_path / "kitti.caffemodel")
        assert net.blob_shapes["fc"] == (1, 397)
        for c in convs[:k]:
            assert torch.equal(conv_weight(net, c), conv_weight(kitti, c))
            assert all(net.learnable[u.learnable].lr_mult == 0 for u in net.blob_uses[net.layer_by_name(c)])
    net = CaffeNet(filter_net(read_net(TRANSFER / "imagenet_train_val.prototxt"), net_state("TRAIN")), shapes)
    load_weights(net, tmp_path / "kitti.caffemodel")
    assert net.blob_shapes["fc8"] == (1, 1000)
    for c in convs:
        assert torch.equal(conv_weight(net, c), conv_weight(kitti, c))
        assert net.learnable[net.blob_uses[net.layer_by_name(c)][0].learnable].lr_mult == 1


def test_auto_device_never_requests_cuda_that_torch_cannot_see(monkeypatch):
    """onnxruntime-gpu lists its CUDA provider on machines without a GPU and prints its own errors when asked
    for it: auto asks torch first and stays on the CPU; --device cuda is one line."""
    import onnxruntime

    from runner.probe import providers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(CaffeError, match=r"^--device cuda: no CUDA device is usable here$"):
        providers("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
