"""The experiment engine (runner/experiments/): an experiment folder obeys its prototxts, scales override
them visibly, runs resume, the snapshot rules pick what they say, and results come out."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter import experiment_pb2
from converter.errors import CaffeError
from runner.experiments import engine, spec
from runner.experiments.__main__ import main
from tests.test_mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mnist_env(monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir()))


def edit(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def test_a_copied_experiment_trains_with_its_own_edited_values(tmp_path, mnist_env):
    """The user's habit: copy prototxt/mnist, edit a learning rate, a margin and a batch size, `make train`."""
    copy = tmp_path / "my_copy"
    shutil.copytree(ROOT / "prototxt" / "mnist", copy)
    edit(copy / "egomotion_solver.prototxt", "base_lr: 0.01\n", "base_lr: 0.0234\n")
    edit(copy / "sfa_train_val.prototxt", "margin: 10 }", "margin: 7.5 }")
    edit(copy / "egomotion_train_val.prototxt", 'source: "data/mnist/pairs_train_lmdb" batch_size: 125',
         'source: "data/mnist/pairs_train_lmdb" batch_size: 50')
    edit(copy / "egomotion_train_val.prototxt", 'source: "data/mnist/pairs_train_labels_lmdb" batch_size: 125',
         'source: "data/mnist/pairs_train_labels_lmdb" batch_size: 50')
    done = subprocess.run(["make", "-s", "train", f"EXP={copy}", "SCALE=smoke", f"RUNS={tmp_path / 'runs'}",
                           f"DATA={tmp_path / 'data'}", f"PY={sys.executable}"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "MNIST_DIR": str(mnist_dir())})
    assert done.returncode == 0, done.stderr[-2000:]
    runs = tmp_path / "runs" / "my_copy" / "smoke"
    assert "base_lr: 0.0234" in (runs / "egomotion" / "solver.prototxt").read_text()
    assert "Iteration 0, lr = 0.0234" in (runs / "egomotion" / "train.log").read_text()
    net = (runs / "egomotion" / "net.prototxt").read_text()
    assert net.count("batch_size: 50") == 2 and str(tmp_path / "data" / "my_copy" / "smoke") in net
    assert "margin: 7.5" in (runs / "sfa10" / "net.prototxt").read_text()
    assert "margin10" in (runs / "sfa10" / "solver.prototxt").read_text()
    # the scale's overrides were printed and are listed in the run folder
    assert "scale smoke: run sfa10: train_batch_size = 25" in done.stdout
    listed = (runs / "sfa10" / "overrides.txt").read_text()
    assert "train_batch_size = 25" in listed and "solver_override.max_iter = 20" in listed
    assert "batch_size: 25" in (runs / "sfa10" / "net.prototxt").read_text()


def test_mnist_smoke_end_to_end_resumes_and_reuses(tmp_path, capfd, mnist_env):
    argv = ["mnist", "--scale", "smoke", "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    assert main(["eval", *argv]) == 2  # nothing pre-trained yet: one clear line
    assert "make train EXP=mnist SCALE=smoke" in capfd.readouterr().err
    assert main(["train", *argv]) == 0
    runs = tmp_path / "runs" / "mnist" / "smoke"
    for name in ("egomotion", "sfa10", "sfa100"):
        assert (runs / name / "CHOSEN").exists() and (runs / name / "curves.png").exists()
        # the thesis's rule: the last snapshot before max_iter (20), and the tower's share of live features
        record = json.loads((runs / name / "result.json").read_text())
        assert record["snapshot"] == "snap_iter_10.caffemodel" and 0.0 <= record["alive"] <= 1.0
        log = (runs / name / "train.log").read_text()
        assert log.count("Iteration 0, Testing net (#0)") == 1
        # the run's figures: 20 iterations, their speed, on the CPU with the run's one thread
        assert re.search(r"20 iterations in [0-9.]+ s: [0-9.]+ iter/s, [0-9,]+ images/s on CPU \(1 intra-op "
                         r"threads\), 0 data worker\(s\)", log)
    # an interrupted pre-training (its last snapshot and records gone) resumes from its newest snapshot
    for leftover in ("CHOSEN", "result.json", "snap_iter_20.caffemodel", "snap_iter_20.solverstate"):
        (runs / "sfa10" / leftover).unlink()
    capfd.readouterr()
    assert main(["train", *argv]) == 0
    out = capfd.readouterr().out
    assert "sfa10: resuming from snap_iter_10.solverstate" in out
    assert "Restoring previous solver status from" in (runs / "sfa10" / "train.log").read_text()
    assert (runs / "sfa10" / "snap_iter_20.caffemodel").exists()
    assert main(["eval", *argv, "--jobs", "2"]) == 0
    rows = list(csv.DictReader(open(runs / "results.csv")))
    assert sorted(r["run"] for r in rows) == ["finetune_egomotion", "finetune_sfa10", "finetune_sfa100", "scratch"]
    for r in rows:
        assert 0.0 <= float(r["accuracy_full_test"]) <= 1.0
        # the thesis's measure is one batch of 125 digits: a multiple of 1/125
        assert float(r["accuracy_last_batch"]) * 125 == pytest.approx(round(float(r["accuracy_last_batch"]) * 125),
                                                                      abs=1e-3)
    scored = (runs / "finetune_egomotion" / "100_seed1" / "test.log").read_text()  # `caffe test`'s log
    assert "Batch 79, accuracy = " in scored and "Batch 80," not in scored  # 10,000 digits / 125
    assert "random_seed: 1" in (runs / "scratch" / "100_seed1" / "solver.prototxt").read_text()
    table = (runs / "results.md").read_text()
    assert "| egomotion |" in table and "[0.75]" in table and "last test batch" in table
    assert "| labels | egomotion − from scratch |" in table and "more than 5 points from the thesis" in table
    assert "of its `norm2` features are non-zero on a test batch" in table
    assert (runs / "accuracy.png").stat().st_size > 1000 and (runs / "pretraining_loss.png").stat().st_size > 1000
    # --jobs never changes a number: the from-scratch run (every layer learning) trained again alone
    scratch = runs / "scratch" / "100_seed1"
    side_by_side = (scratch / "snap_iter_10.caffemodel").read_bytes()
    shutil.rmtree(scratch)
    assert main(["eval", *argv, "--jobs", "1"]) == 0
    assert (scratch / "snap_iter_10.caffemodel").read_bytes() == side_by_side
    capfd.readouterr()
    assert main(["train", *argv]) == 0  # everything done before is reused, not redone
    out = capfd.readouterr().out
    assert out.count("is ready") == 2 and "training (log" not in out


def snaps(folder: Path, *iters: int) -> None:
    for it in iters:
        (folder / f"snap_iter_{it}.caffemodel").write_bytes(b"")


def test_snapshot_rules(tmp_path):
    snaps(tmp_path, 1000, 2000, 3000)
    (tmp_path / "solver.prototxt").write_text('max_iter: 3000\nlr_policy: "fixed"\n')
    (tmp_path / "train.csv").write_text(
        "iter,seconds,phase,name,value\n"
        "1000,1,train,smoothed_loss,0.5\n2000,2,train,smoothed_loss,0.2\n2500,3,train,smoothed_loss,0.1\n"
        "2000,4,train,smoothed_loss,0.9\n"  # resumed from 1000: iteration 2000 again, now worse
        "3000,5,train,smoothed_loss,0.4\n1000,5,test0,accuracy,0.7\n2000,5,test0,accuracy,0.6\n")
    Rule = experiment_pb2.SnapshotRule

    def pick(**kw) -> str:
        return engine.choose_snapshot(tmp_path, experiment_pb2.SnapshotRule(**kw)).name

    assert pick(rule=Rule.LAST) == "snap_iter_3000.caffemodel"
    assert pick(rule=Rule.LAST_RECORDED) == "snap_iter_2000.caffemodel"  # the thesis: 39,000 of 40,000
    assert pick(rule=Rule.LOWEST_TRAIN_LOSS) == "snap_iter_3000.caffemodel"  # 0.9 at 2000 after the resume
    assert pick(rule=Rule.BEST_TEST) == "snap_iter_1000.caffemodel"
    with pytest.raises(CaffeError, match="BEST_TEST needs test 'top5'"):
        pick(rule=Rule.BEST_TEST, output="top5")


def test_scale_overrides_replace_fields_and_are_listed():
    exp = spec.load("mnist", "demo")
    sfa = exp.run("sfa10")
    assert sfa.solver_override.max_iter == 600 and not sfa.HasField("train_batch_size")  # the thesis's 800
    assert "run sfa10: solver_override.max_iter = 600" in exp.overrides
    assert exp.data_stage("pairs").mnist_pairs.train_pairs == 60000
    assert exp.data_stage("pairs").mnist_pairs.val_seed == 1  # untouched fields keep the experiment's value
    smoke = spec.load("mnist", "smoke")
    assert list(smoke.run("scratch").label_count) == [100]  # repeated fields are replaced whole
    full = spec.load("mnist", "full")
    assert full.overrides == [] and list(full.run("scratch").label_count) == [100, 300, 1000, 10000]


@pytest.mark.parametrize("text, message", [
    ('run { name: "a" solver: "nope.prototxt" }', "no such solver"),
    ('run { name: "a" solver: "egomotion_solver.prototxt" weights: "b" }', "takes its weights from 'b'"),
    ('run { name: "a" solver: "egomotion_solver.prototxt" } run { name: "a" solver: "egomotion_solver.prototxt" }',
     "run 'a' is defined twice"),
    ('run { name: "a" solver: "egomotion_solver.prototxt" } scale { name: "demo" run { name: "b" } }',
     "overrides run 'b', which the experiment does not define"),
    ('run { name: "a" solver: "egomotion_solver.prototxt" max_iter: 3 }', "experiment.prototxt:1:"),
])
def test_experiment_mistakes_are_one_line(tmp_path, text, message):
    shutil.copy(ROOT / "prototxt" / "mnist" / "egomotion_solver.prototxt", tmp_path)
    (tmp_path / "experiment.prototxt").write_text(text + "\n")
    with pytest.raises(CaffeError, match=message):
        spec.load(str(tmp_path), "demo")


def test_gpu_jobs_each_take_a_gpu_in_turn(monkeypatch):
    """Job processes side by side get the GPUs of --gpu in turn (more jobs than GPUs share them); a job run in
    this process takes the first GPU named."""
    import multiprocessing

    import torch

    from runner import threads as cpu_threads

    monkeypatch.setattr(engine, "_WORKER_GPU", [])
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    taken, threads = [], torch.get_num_threads()
    try:
        for _ in range(3):
            engine.init_job_process(1, [3, 5], counter)
            taken.append(engine.job_gpu("3,5"))
    finally:
        for _ in taken:
            cpu_threads.stop()  # each job process registered its one fixed thread
        torch.set_num_threads(threads)
    assert taken == ["3", "5", "3"]
    engine._WORKER_GPU.clear()
    assert engine.job_gpu("2,1") == "2" and engine.job_gpu(None) is None


def test_gpu_without_cuda_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert main(["train", "mnist", "--gpu", "0"]) == 2
    assert "--gpu 0: CUDA is not available here" in capsys.readouterr().err


def test_no_such_experiment_or_scale(capsys):
    assert main(["train", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert main(["train", "mnist", "--scale", "huge"]) == 2
    assert "no scale 'huge' (scales: full, demo, smoke)" in capsys.readouterr().err


SUN = ROOT.parent / "shared" / "data" / "sun_subset8"
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet_samples"


def test_transfer_images_from_class_folders_and_tables(tmp_path, monkeypatch):
    if not SUN.is_dir() or not IMAGENET.is_dir():
        pytest.skip("../shared/data/sun_subset8 or imagenet_samples is absent")
    from runner.experiments import data_stages

    exp = spec.load("transfer", "demo")
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SUN_DIR", os.path.relpath(SUN, ROOT))  # as the README writes it: ../shared/data/…
    # a missing ImageNet folder stops the experiment at the data stages, before any probe trains
    with pytest.raises(CaffeError, match="IMAGENET_DIR is not set"):
        engine.make_data(exp, engine.Place(tmp_path / "runs", tmp_path / "data"))
    lines = (tmp_path / "data" / "sun397" / "train_5_p1.txt").read_text().splitlines()
    assert len(lines) == 8 * 5 and lines[0].endswith(" 0") and "/train/aquarium/" in lines[0]
    first = Path(lines[0].rsplit(" ", 1)[0])  # absolute: the lists are read from their own folder
    assert first.is_absolute() and first.is_file()
    assert len((tmp_path / "data" / "sun397" / "test_10_p1.txt").read_text().splitlines()) == 80
    sun = exp.data_stage("sun").image_set
    sun.per_class[:] = [20]  # the thesis's 20 per class exceeds the sample's 10: refused in one line
    with pytest.raises(CaffeError, match="20 images per class asked, but the largest class holds 10"):
        data_stages.image_set(sun, tmp_path / "x", print)
    imagenet = exp.data_stage("imagenet").image_set
    monkeypatch.setenv("IMAGENET_DIR", str(IMAGENET))
    (train, test), = data_stages.image_pools(imagenet)
    assert len(train) == 100 and test is train and train[1].label == 10 and train[1].ref.endswith("brambling.JPEG")


def test_probe_head_is_the_probe_net_without_the_tower():
    from converter.io import read_net
    from runner.experiments.probes import head

    tower = {lp.name for lp in read_net(ROOT / "prototxt" / "kitti" / "bcnn_deploy.prototxt").layer}
    probe_net = read_net(ROOT / "prototxt" / "transfer" / "sun397_probe_train_val.prototxt")
    l1 = head(probe_net, "L1", tower, 125, {"norm1": 96 * 27 * 27})
    assert [lp.name for lp in l1.layer] == ["features", "fc_L1", "loss"]
    assert list(l1.layer[0].top) == ["norm1", "label"] and list(l1.layer[0].input_param.shape[0].dim) == [125, 69984]
    l3 = head(probe_net, "L3", tower, 125, {"conv3": 10})
    assert [lp.name for lp in l3.layer] == ["features", "fc_prev_L3", "relu_prev", "fc_mlp", "loss"]


@pytest.mark.parametrize("run, copied", [("egomotion", ["conv1", "conv2"]), ("sfa10", ["conv1", "conv2"])])
def test_fine_tuning_inherits_what_the_thesis_transferred(tmp_path, run, copied):
    """The thesis's SFA head is fc1/fc2, so `copy_from` brings only the convolutions into the classifier (whose
    own fc is fc500), as for egomotion: each method hands on the same layers."""
    from converter.io import filter_net, net_state, read_net, read_solver
    from converter.net import CaffeNet
    from converter.weights import copy_trained_layers, save_weights

    exp = spec.load("mnist", "full")
    sp = read_solver(exp.path(exp.run(run).solver))
    net = filter_net(read_net(exp.path(Path(sp.net).name)), net_state("TRAIN", 0, list(sp.train_state.stage)))
    shapes = {"pairs": (1, 2, 28, 28), "sim": (1,), "motion": (1, 3)}
    save_weights(CaffeNet(net, shapes), tmp_path / "pre.caffemodel")
    classifier = filter_net(read_net(exp.path("classifier_train_val.prototxt")), net_state("TRAIN"))
    target = CaffeNet(classifier, {"digits": (1, 1, 28, 28), "label": (1,)})
    source = read_net(tmp_path / "pre.caffemodel")
    ignored = copy_trained_layers(target, source, "pre.caffemodel")
    with_blobs = [lp.name for lp in source.layer if lp.blobs]
    assert sorted(set(with_blobs) - set(ignored)) == copied


KITTI = ROOT.parent / "shared" / "data" / "kitti_odometry_00"


@pytest.mark.slow
def test_kitti_experiment_pairs_labels_resume_and_rule(tmp_path, monkeypatch, capfd):
    """`make train EXP=kitti` on the sample: the pairs `egomotion data kitti-pairs` makes with the same flags,
    the thesis's world-frame labels, a resumed run after an interrupt, the snapshot its rule names."""
    if not (KITTI / "poses" / "00.txt").exists():
        pytest.skip(f"{KITTI} is absent")
    from runner.cli import main as cli

    monkeypatch.setenv("KITTI_DIR", str(KITTI))
    argv = ["kitti", "--scale", "smoke", "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    assert main(["train", *argv]) == 0
    data = tmp_path / "data" / "kitti" / "smoke" / "egomotion"
    assert cli(["data", "kitti-pairs", "--kitti-dir", str(KITTI), "--out", str(tmp_path / "by_hand"),
                "--camera", "image_0", "--mode", "color", "--train", "00:0-119", "--val", "00:120-150",
                "--train-pairs", "24", "--val-pairs", "8", "--translation-frame", "world"]) == 0
    for split in ("train", "val"):
        assert (data / f"pairs_{split}.tsv").read_text() == (tmp_path / "by_hand" / f"pairs_{split}.tsv").read_text()
    runs = tmp_path / "runs" / "kitti" / "smoke"
    for name in ("KITTI-EGO", "KITTI-SFA"):
        chosen = Path((runs / name / "CHOSEN").read_text().strip())
        losses = {}
        for row in csv.DictReader(open(runs / name / "train.csv")):
            if row["name"] == "smoothed_loss" and (runs / name / f"snap_iter_{row['iter']}.caffemodel").exists():
                losses[int(row["iter"])] = float(row["value"])
        assert chosen.name == f"snap_iter_{min(losses, key=losses.get)}.caffemodel"  # LOWEST_TRAIN_LOSS
        assert (runs / f"{name}.caffemodel").read_bytes() == chosen.read_bytes()
    for leftover in ("CHOSEN", "result.json", "snap_iter_4.caffemodel", "snap_iter_4.solverstate"):
        (runs / "KITTI-SFA" / leftover).unlink()
    capfd.readouterr()
    assert main(["train", *argv]) == 0
    assert "KITTI-SFA: resuming from snap_iter_2.solverstate" in capfd.readouterr().out
    assert (runs / "KITTI-SFA" / "snap_iter_4.caffemodel").exists() and (runs / "KITTI-SFA" / "CHOSEN").exists()


def test_a_data_stage_is_made_again_from_another_source_folder(tmp_path, monkeypatch):
    """A stage is 'ready' only for the folder it was made from: pointing SUN_DIR elsewhere makes it again
    (it used to reuse the first folder's lists silently)."""
    if not SUN.is_dir():
        pytest.skip("../shared/data/sun_subset8 is absent")
    from runner.experiments import data_stages

    stage = spec.load("transfer", "demo").data_stage("sun")
    said: list[str] = []
    monkeypatch.setenv("SUN_DIR", str(SUN))
    data_stages.make(stage, tmp_path / "data", said.append)
    data_stages.make(stage, tmp_path / "data", said.append)
    copy = tmp_path / "sun_copy"
    shutil.copytree(SUN, copy)
    monkeypatch.setenv("SUN_DIR", str(copy))
    data_stages.make(stage, tmp_path / "data", said.append)
    assert [line.split(":")[0] + (" ready" if "is ready" in line else "") for line in said if line.startswith(
        "data sun")] == ["data sun", "data sun ready", "data sun"]
    listing = (tmp_path / "data" / stage.folder / "train_5_p1.txt").read_text()
    assert str(copy) in listing and str(SUN) + "/" not in listing
