"""``egomotion train`` as a program: resume after SIGKILL is bit-identical, setup errors are one line
with exit code 2 before any work, NaN stops with a snapshot, signals, logs parse like Caffe's, and the
test / time / plot verbs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import blob_to_array, read_binary, read_net, read_solver
from runner.train import Signals, Trainer, TrainOptions, run
from tests.golden import GOLDEN, REFERENCE

DATA = GOLDEN / "_data"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="golden _data is absent")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lenet(dropout: bool = True, mirror: bool = True, train_source: str | None = None) -> str:
    """The golden LeNet with absolute sources; optionally a Dropout and random mirroring (so that resume
    has torch and data randomness to get right)."""
    net = caffe_pb2.NetParameter()
    text_format.Merge((GOLDEN / "sgd_inv" / "train_test.prototxt").read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = str((GOLDEN / "sgd_inv" / lp.data_param.source).resolve())
            if lp.include[0].phase == caffe_pb2.TRAIN:
                lp.transform_param.mirror = mirror
                if train_source:
                    lp.data_param.source = train_source
    if dropout:
        drop = caffe_pb2.LayerParameter(name="drop1", type="Dropout", bottom=["ip1"], top=["ip1"])
        index = [lp.name for lp in net.layer].index("relu1") + 1
        layers = list(net.layer)
        layers.insert(index, drop)
        del net.layer[:]
        net.layer.extend(layers)
    return text_format.MessageToString(net)


def write_case(folder: Path, max_iter: int = 40, snapshot: int = 10, train_source: str | None = None,
               **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.prototxt").write_text(lenet(train_source=train_source))
    sp = caffe_pb2.SolverParameter(net=str(folder / "net.prototxt"), base_lr=0.01, momentum=0.9,
                                   weight_decay=5e-4, lr_policy="inv", gamma=1e-4, power=0.75, display=5,
                                   max_iter=max_iter, snapshot=snapshot, snapshot_prefix=str(folder / "lenet"),
                                   random_seed=7, solver_mode=caffe_pb2.SolverParameter.CPU)
    sp.test_iter.append(2)
    sp.test_interval = 15
    for k, v in fields.items():
        setattr(sp, k, v)
    path = folder / "solver.prototxt"
    path.write_text(text_format.MessageToString(sp))
    return path


def cli_here(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from runner.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=kw.pop("cwd", ROOT), env=env,
                          capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def weights_of(path: Path) -> list[np.ndarray]:
    return [blob_to_array(b) for lp in read_net(path).layer for b in lp.blobs]


# ------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    full = write_case(tmp_path / "full")
    run(read_solver(full), str(full), TrainOptions(progress=False))  # in this process: same arithmetic

    cut = write_case(tmp_path / "cut")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "train", "--solver", str(cut)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "cut/lenet_iter_20.solverstate").exists():
        time.sleep(0.005)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not (tmp_path / "cut/lenet_iter_40.caffemodel").exists()
    states = sorted((tmp_path / "cut").glob("lenet_iter_*.solverstate"),
                    key=lambda p: int(re.search(r"_iter_(\d+)", p.name)[1]))
    states = [s for s in states if int(re.search(r"_iter_(\d+)", s.name)[1]) < 40]
    assert states, "no snapshot was written before the kill"
    resumed = cli("train", "--solver", str(cut), "--snapshot", str(states[-1]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring previous solver status" in resumed.stderr

    for a, b in zip(weights_of(tmp_path / "full/lenet_iter_40.caffemodel"),
                    weights_of(tmp_path / "cut/lenet_iter_40.caffemodel"), strict=True):
        assert np.array_equal(a, b)
    sa = read_binary(tmp_path / "full/lenet_iter_40.solverstate", caffe_pb2.SolverState())
    sb = read_binary(tmp_path / "cut/lenet_iter_40.solverstate", caffe_pb2.SolverState())
    assert sa.iter == sb.iter == 40
    for a, b in zip(sa.history, sb.history, strict=True):
        assert np.array_equal(blob_to_array(a), blob_to_array(b))
    # the resumed log continues with the same numbers
    last = [line for line in (tmp_path / "full/train.log").read_text().splitlines() if "] Iteration 40, loss" in line]
    assert last and last[-1].split("] ")[1] in resumed.stderr


@pytest.mark.parametrize("change,message", [
    (dict(lr_policy="cosine"), "unknown lr_policy 'cosine'"),
    (dict(type="AdaGrad"), "momentum cannot be used with AdaGrad"),
    (dict(snapshot_prefix="/nonexistent/folder/x"), "cannot write in folder '/nonexistent/folder'"),
    (dict(train_source="/nonexistent/lmdb"), "/nonexistent/lmdb"),
])
def test_setup_errors_are_one_line_before_any_work(tmp_path, capsys, change, message):
    source = change.pop("train_source", None)
    solver = write_case(tmp_path, train_source=source, **change)
    code, _, err = cli_here(capsys, "train", "--solver", str(solver))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egomotion train: error: "), err
    assert message in lines[0]
    assert not list(tmp_path.glob("*.caffemodel")) and not (tmp_path / "train.log").exists()


def test_weights_and_snapshot_together_are_refused(tmp_path, capsys):
    solver = write_case(tmp_path)
    code, _, err = cli_here(capsys, "train", "--solver", str(solver), "--weights", "a.caffemodel", "--snapshot",
                            "b.solverstate")
    assert code == 2 and "not both" in err


def test_nan_loss_stops_with_a_snapshot(tmp_path):
    sp = read_solver(write_case(tmp_path, max_iter=30, base_lr=1e6, lr_policy="fixed"))
    with pytest.raises(Exception, match=r"the loss is -?(nan|inf) at iteration (\d+)") as info:
        run(sp, str(tmp_path / "solver.prototxt"), TrainOptions(progress=False))
    it = int(re.search(r"at iteration (\d+)", str(info.value))[1])
    assert (tmp_path / f"lenet_iter_{it}_nan.caffemodel").exists()
    state = read_binary(tmp_path / f"lenet_iter_{it}_nan.solverstate", caffe_pb2.SolverState())
    assert state.iter == it


def _trainer(folder: Path, defer: bool, **fields) -> Trainer:
    sp = read_solver(write_case(folder, **fields))
    trainer = Trainer(sp, str(folder / "solver.prototxt"), TrainOptions(progress=False, quiet=True))
    trainer.defer_losses = defer  # the GPU mode of the loop, run on the CPU
    return trainer


def test_losses_read_late_give_the_same_log_and_weights(tmp_path, monkeypatch):
    """Losses kept on the device and read at display iterations (what a GPU run does) give the same smoothed
    losses (average_loss 4: the ring is fed in order) and weights as reading each at once, with one host
    transfer per display instead of one per iteration."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or original(self))
    results = {}
    for defer in (False, True):
        reads.clear()
        trainer = _trainer(tmp_path / str(defer), defer, max_iter=30, snapshot=0, display=10, average_loss=4,
                           test_interval=1000, test_initialization=False)
        try:
            records = trainer.solve()
        finally:
            trainer.close()
        results[defer] = (records, [p.detach().clone() for p in trainer.net.params], list(reads))
    (plain, weights, reads_plain), (late, weights_late, reads_late) = results[False], results[True]
    assert [(r.iter, r.loss, r.lr) for r in plain] == [(r.iter, r.loss, r.lr) for r in late]
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_late, strict=True))
    assert reads_plain == [1] * 30
    assert reads_late == [1, 10, 10, 9]  # at iterations 0, 10, 20 and after the last


def test_a_nan_read_late_names_its_iteration_and_keeps_the_later_weights(tmp_path):
    trainer = _trainer(tmp_path, True, max_iter=30, base_lr=1e6, lr_policy="fixed", display=5)
    try:
        with pytest.raises(Exception, match=r"the loss is -?(nan|inf) at iteration (\d+): .* state before iteration "
                                            r"(\d+) \(on a GPU the loss is read every display") as info:
            trainer.solve()
    finally:
        trainer.close()
    nan_at, read_at = map(int, re.search(r"at iteration (\d+).*before iteration (\d+)", str(info.value)).groups())
    assert nan_at < read_at and read_at % 5 == 0
    state = read_binary(tmp_path / f"lenet_iter_{read_at}_nan.solverstate", caffe_pb2.SolverState())
    assert state.iter == read_at


def test_labels_checked_on_the_device_stop_where_the_losses_are_read(tmp_path):
    """A GPU step reads no label range back: the check is a device flag per loss layer, read with the losses.
    Run on the CPU in that mode, a net with 5 classes fed digits 0-9 stops at the first read with the layer's
    one-line error (read at once, it stops in the first forward naming the value)."""
    folder = tmp_path / "late"
    sp = read_solver(write_case(folder, max_iter=30, snapshot=0, display=10, test_interval=1000,
                                test_initialization=False))
    net = folder / "net.prototxt"
    net.write_text(net.read_text().replace("num_output: 10", "num_output: 5"))
    trainer = Trainer(sp, str(folder / "solver.prototxt"), TrainOptions(progress=False, quiet=True))
    trainer.defer_losses = True
    try:
        with pytest.raises(CaffeError, match=r"layer 'loss' \(SoftmaxWithLoss\): a label outside \[0, 5\) "
                                             r"reached this layer \(checked on the device"):
            trainer.solve()
        assert trainer.solver.iter == 0  # iteration 0 displays: the losses (and the flags) are read there
    finally:
        trainer.close()
    with pytest.raises(CaffeError, match=r"label value \d outside \[0, 5\)"):
        run(read_solver(folder / "solver.prototxt"), str(folder / "solver.prototxt"),
            TrainOptions(progress=False, quiet=True))


def test_the_graphed_pass_is_plumbed_like_the_eager_one(tmp_path, monkeypatch):
    """--cuda-graph's plumbing on the CPU: torch's capture replaced by a stand-in that runs the pass three
    times (as its warm-up does) and then returns it eagerly. The run's losses and weights equal the eager
    run's (inputs in order, outputs by name, the loss copied out, the warm-up's effects undone); a capture
    that fails is a warning line and an eager run."""
    import runner.cuda_graph as cuda_graph

    def stand_in(module, args, allow_unused_input=False):
        for _ in range(3):
            module(*args)[0].sum()  # the warm-up's passes (Dropout draws, BatchNorm statistics)
        return module

    monkeypatch.setattr(cuda_graph.torch.cuda, "make_graphed_callables", stand_in)
    results = {}
    for mode in ("eager", "graphed", "failed"):
        if mode == "failed":
            monkeypatch.setattr(cuda_graph.torch.cuda, "make_graphed_callables",
                                lambda *a, **k: (_ for _ in ()).throw(RuntimeError("capture not permitted")))
        sp = read_solver(write_case(tmp_path / mode, max_iter=12, snapshot=0, display=4, test_interval=1000,
                                    test_initialization=False))
        trainer = Trainer(sp, str(tmp_path / mode / "solver.prototxt"), TrainOptions(progress=False))
        trainer.opts.cuda_graph = mode != "eager"  # past the GPU check: the stand-in needs none
        try:
            records = trainer.solve()
        finally:
            trainer.close()
        results[mode] = ([(r.iter, r.loss) for r in records], [p.detach().clone() for p in trainer.net.params])
    for mode in ("graphed", "failed"):
        assert results[mode][0] == results["eager"][0]
        assert all(torch.equal(a, b) for a, b in zip(results[mode][1], results["eager"][1], strict=True))
    assert "captured as CUDA graphs" in (tmp_path / "graphed" / "train.log").read_text()
    assert "CUDA graph capture failed (RuntimeError: capture not permitted); training eagerly" in \
        (tmp_path / "failed" / "train.log").read_text()


def test_signals_stop_and_snapshot(tmp_path, monkeypatch):
    sp = read_solver(write_case(tmp_path, max_iter=30, snapshot=0))
    requests = {3: "snapshot", 7: "stop"}
    trainer = Trainer(sp, str(tmp_path / "solver.prototxt"), TrainOptions(progress=False))
    original = Signals.request
    monkeypatch.setattr(Signals, "request", lambda self: requests.pop(trainer.solver.iter, None) or original(self))
    try:
        trainer.solve()
    finally:
        trainer.close()
    assert trainer.stopped_early and trainer.solver.iter == 7
    assert (tmp_path / "lenet_iter_3.caffemodel").exists() and (tmp_path / "lenet_iter_7.solverstate").exists()
    assert "Optimization stopped early." in (tmp_path / "train.log").read_text()


def test_signal_handler_maps_effects():
    s = Signals("stop", "snapshot")
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert s.request() == "snapshot" and s.request() == "stop" and s.request() == "none"
    finally:
        s.restore()


def test_log_parses_like_parse_log_py(tmp_path):
    """The regexes of Caffe's tools/extra/parse_log.py, and its MMDD date field."""
    sp = read_solver(write_case(tmp_path, max_iter=10, snapshot=0))
    run(sp, str(tmp_path / "solver.prototxt"), TrainOptions(progress=False))
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert any("Solving lenet_like" in line for line in lines)
    iteration = re.compile(r"Iteration (\d+)")
    train_out = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
    test_out = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
    lr = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
    its, lrs, trains, tests = set(), [], [], []
    for line in lines:
        if (m := iteration.search(line)):
            its.add(int(m[1]))
        if (m := lr.search(line)):
            lrs.append(float(m[1]))
            assert line.split()[8] == m[1]  # parse_log.sh's awk $9
        if (m := train_out.search(line)):
            trains.append(m[2])
        if (m := test_out.search(line)):
            tests.append(m[2])
            assert line.split()[10] == m[3]  # parse_log.sh's awk $11
        fields = line.split()
        if fields and re.fullmatch(r"I\d{4}", fields[0]):
            month, day = int(fields[0][1:3]), int(fields[0][3:5])
            assert 1 <= month <= 12 and 1 <= day <= 31
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}", fields[1])
    assert {0, 5, 10} <= its and len(lrs) == 2 and set(trains) == {"loss"} and set(tests) == {"accuracy", "loss"}
    csv = (tmp_path / "train.csv").read_text().splitlines()
    assert csv[0] == "iter,seconds,phase,name,value"
    assert any(row.startswith("0,") and ",test0,accuracy," in row for row in csv)


def test_test_verb_reproduces_caffes_final_test(capsys, monkeypatch):
    """sgd_inv's final weights scored on the 200 test images: Caffe's test at iteration 60 saw the same."""
    monkeypatch.chdir(GOLDEN / "sgd_inv")
    code, out, err = cli_here(capsys, "test", "--model", "train_test.prototxt", "--weights",
                              "final_iter_60.caffemodel", "--iterations", "4")
    assert code == 0, err[-2000:]
    values = dict(line.split(" = ") for line in out.splitlines())
    assert float(values["accuracy"]) == pytest.approx(0.86, abs=1e-6)
    assert float(values["loss"]) == pytest.approx(0.429848, rel=1e-4)
    assert "Batch 3, accuracy" in err


def test_time_verb_reports_every_layer():
    from runner.time_cmd import time_net

    result = time_net(str(REFERENCE / "timing" / "lenet_b64.prototxt"), iterations=2)
    assert list(result["layers"]) == ["data", "label", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2",
                                      "loss"]
    assert result["backward_ms"] > 0 and result["forward_backward_ms"] > 0
    assert result["layers"]["conv2"][1] > 0


def test_plot_verb_reads_caffes_own_log(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    code, out, err = cli_here(capsys, "plot", str(GOLDEN / "sgd_inv" / "caffe.log"), "-o", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "61 loss points, 60 lr points, 8 test points" in out


def test_two_processes_equal_one_with_both_batches(tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 32 each = one process with batch 64: rank r reads records
    r, r+2, … (Caffe's DataReader with solver_count 2) and the gradients are averaged, so the update is
    the same."""
    for name, batch in (("two", 32), ("one", 64)):
        folder = tmp_path / name
        solver = write_case(folder, max_iter=6, snapshot=0, display=1, test_interval=0)
        net = caffe_pb2.NetParameter()
        text_format.Merge((folder / "net.prototxt").read_text(), net)
        layers = [lp for lp in net.layer if lp.type != "Dropout"]
        del net.layer[:]
        net.layer.extend(layers)
        for lp in net.layer:
            if lp.type == "Data" and lp.include[0].phase == caffe_pb2.TRAIN:
                lp.transform_param.mirror = False
                lp.data_param.batch_size = batch
        (folder / "net.prototxt").write_text(text_format.MessageToString(net))
        sp = read_solver(solver)
        del sp.test_iter[:]
        solver.write_text(text_format.MessageToString(sp))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "runner.cli", "train", "--solver", str(tmp_path / "two/solver.prototxt")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    run(read_solver(tmp_path / "one/solver.prototxt"), str(tmp_path / "one/solver.prototxt"),
        TrainOptions(progress=False))
    one_log = (tmp_path / "one/train.log").read_text()
    for a, b in zip(weights_of(tmp_path / "one/lenet_iter_6.caffemodel"),
                    weights_of(tmp_path / "two/lenet_iter_6.caffemodel"), strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
    losses = [re.findall(r"\] Iteration (\d+) \(.*\), loss = (\S+)", out) for out in (one_log, two.stderr)]
    assert len(losses[0]) == 6 and [i for i, _ in losses[0]] == [i for i, _ in losses[1]]
    for (_, a), (_, b) in zip(*losses, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_resume_from_caffes_own_solverstate(tmp_path, monkeypatch):
    """sgd_inv's final_iter_60.solverstate (written by Caffe, learned_net relative to its folder): one more
    iteration; iteration 60's loss and test are those Caffe printed after its last update."""
    case = GOLDEN / "sgd_inv"
    monkeypatch.chdir(case)
    sp = read_solver("solver.prototxt")
    sp.snapshot_prefix = str(tmp_path / "final")
    trainer = run(sp, "solver.prototxt", TrainOptions(snapshot=str(case / "final_iter_60.solverstate"),
                                                      iterations=61, progress=False))
    first = trainer.records[0]
    assert first.iter == 60 and first.loss == pytest.approx(0.210091, rel=1e-4)
    assert first.lr == pytest.approx(0.00995524, rel=1e-5)
    tests = {name: v for it, _, name, v in trainer.tests if it == 60}
    assert tests["accuracy"] == pytest.approx(0.86, abs=1e-6) and tests["loss"] == pytest.approx(0.429848, rel=1e-4)
    state = read_binary(tmp_path / "final_iter_61.solverstate", caffe_pb2.SolverState())
    assert state.iter == 61 and len(state.history) == 8


def test_weights_list_is_applied_in_order(tmp_path):
    """--weights a,b: a's layers, then b's over them (copy by layer name; unknown layers ignored)."""
    partial = read_net(GOLDEN / "sgd_inv" / "final_iter_60.caffemodel")
    keep = [lp for lp in partial.layer if lp.name == "ip2"]
    del partial.layer[:]
    partial.layer.extend(keep)
    extra = partial.layer.add(name="not_in_the_net", type="InnerProduct")
    extra.blobs.add().data.append(1.0)
    (tmp_path / "ip2.caffemodel").write_bytes(partial.SerializeToString())
    sp = read_solver(write_case(tmp_path, max_iter=0))
    init = str(DATA / "lenet_init.caffemodel")
    trainer = Trainer(sp, str(tmp_path / "solver.prototxt"),
                      TrainOptions(weights=[f"{init},{tmp_path / 'ip2.caffemodel'}"], progress=False))
    try:
        got = {lp.name: uses for lp, uses in zip(trainer.net.layer_params, trainer.net.blob_uses, strict=True)}
        first = {lp.name: [blob_to_array(b) for b in lp.blobs] for lp in read_net(init).layer}
        second = {lp.name: [blob_to_array(b) for b in lp.blobs] for lp in keep}
        for name, uses in got.items():
            want = second.get(name) or first.get(name, [])
            for use, array in zip(uses, want, strict=True):
                assert np.array_equal(trainer.net.params[use.learnable].detach().numpy().reshape(array.shape), array)
        test_ip2 = trainer.test_nets[0].layer_by_name("ip2")
        shared = trainer.test_nets[0].params[trainer.test_nets[0].blob_uses[test_ip2][0].learnable]
        assert shared is trainer.net.params[got["ip2"][0].learnable]  # test nets share the train net's blobs
    finally:
        trainer.close()


def test_training_does_not_import_the_command_line():
    """The rooms import downwards only: training, its logs, set-up and distributed launch never import the
    command line or the experiments, not even inside a function (a multi-GPU spawn is handed the CLI's main)."""
    import ast

    runner = Path(__file__).resolve().parents[1] / "runner"
    for module in ("train", "distributed", "logs", "netsetup", "solver", "solver_nets", "data"):
        tree = ast.parse((runner / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        upward = {m for m in imported if m and (m.startswith("runner.cli") or m.startswith("runner.experiments"))}
        assert not upward, f"runner/{module}.py imports {upward}"


def test_spawned_child_runs_the_given_entry(monkeypatch):
    from runner import distributed

    seen = {}

    def entry(argv):
        seen.update(argv=argv, rank=os.environ["RANK"], world=os.environ["WORLD_SIZE"])
        return 0

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    distributed._child(1, entry, ["train", "--solver", "s"], [0, 1], 12345)
    assert seen == {"argv": ["train", "--solver", "s"], "rank": "1", "world": "2"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def test_worker_count_never_changes_a_number(tmp_path, capsys):
    """Caffe's prefetch threads never change results: the first 20 losses (dropout and random mirroring in
    the net) are bit-identical with the batches read in this process or by 1 or 3 worker processes."""
    losses = {}
    for workers in (0, 1, 3):
        solver = write_case(tmp_path / f"w{workers}", max_iter=20, snapshot=0, display=1)
        code, _, err = cli_here(capsys, "train", "--solver", str(solver), "--workers", str(workers))
        assert code == 0, err
        log = (tmp_path / f"w{workers}" / "train.log").read_text()
        losses[workers] = re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", log)
    assert len(losses[0]) == 20
    assert losses[1] == losses[0] and losses[3] == losses[0]
