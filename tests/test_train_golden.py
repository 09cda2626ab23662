"""Training trajectories against BVLC Caffe's own (``../shared/reference/golden/<case>/``).

Each case is run as ``caffe train --solver solver.prototxt --weights <init>`` was, from the case folder
(its LMDB paths are relative), with the snapshots redirected to a temporary folder. Checked:

* the learning rate of every iteration, as printed in our log, equals Caffe's ``losses.tsv`` string;
* the loss of every iteration (and the final extra forward) within ``LOSS_RTOL`` of Caffe's;
* the test outputs (``tests.tsv``) within the same tolerance;
* the final weights (``final_iter_<N>.caffemodel``) and, where kept, the solver history
  (``final_iter_<N>.solverstate``): per blob, ``‖ours − Caffe‖₂ / ‖Caffe‖₂`` within ``WEIGHT_RTOL``, and for
  the cases marked exact also every element within 1e-4 relative (floor: 1e-4 of the blob's largest value).

Why the weight bounds are looser than 1e-4: float32 sums in another order than OpenBLAS's differ by
~1e-7 relative, and when an InnerProduct pre-activation lands that close to 0 the ReLU decides differently
for that one sample. We measured it: in ``nesterov`` ip1 unit 455 of sample 44 is +7.6e-7 here; negating
just that value makes all final weights match Caffe's to 3e-7 (worst blob). Such a flip moves one unit's
row by one sample's gradient, which backprop then mixes into the layers below; which cases flip depends on
the summation order, hence on the CPU kernels and the thread count (with 2 threads: multistep, step_lrmult,
nesterov; with 1: also exp). Under AdaGrad (lr 0.01, delta 1e-8, the loss spiking to 10 at iteration 2)
the division by a tiny history amplifies it until the loss itself drifts by up to 7e-4 from iteration 13
on; a float64 run of ours drifts from Caffe by 5e-3 there, so this is the case's sensitivity, not a solver
difference. Cases with no flip on this machine (``exact``) are also held to 1e-4 per element; if one of
them fails only there after a layer's arithmetic changed, look for such a flip first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from converter import caffe_pb2
from converter.io import blob_to_array, read_binary, read_net, read_solver
from runner.train import TrainOptions, run
from tests.golden import GOLDEN

# case: (loss rtol, per-blob relative L2 bound for weights and history, elementwise exact?)
# measured worst (2 threads | 1 thread): loss; weights; history
CASES = {
    "sgd_inv": (1e-4, 5e-3, True),  # 3.4e-6; 6.0e-7 | 1.0e-6; 1.5e-6 | 1.3e-6
    "sgd_policy_exp": (1e-4, 5e-3, False),  # 2.9e-6 | 3.2e-5; 5.3e-7 | 8.5e-4 (conv1 bias)
    "sgd_policy_fixed_l1": (1e-4, 5e-3, True),  # 3.6e-6; 7.3e-7 | 1.1e-6
    "sgd_policy_multistep": (1e-4, 5e-3, False),  # 1.7e-5; 9.0e-5 (ip1 unit 440)
    "sgd_policy_poly": (1e-4, 5e-3, True),  # 4.2e-6; 8.7e-7 | 1.0e-6
    "sgd_step_lrmult": (1e-4, 5e-3, False),  # 5.1e-5 | 4.1e-5; 5.0e-4 | 2.0e-4 (ip1 unit 161)
    "nesterov": (1e-4, 5e-3, False),  # 2.2e-6; 6.8e-5 (ip1 unit 455); history 1.7e-3
    "adagrad": (3e-3, 2e-2, False),  # 7.1e-4; 5.7e-3; history 5.6e-4
    "adam": (1e-4, 5e-3, True),  # 3.2e-6; 2.2e-6 | 2.7e-6; 9.5e-7 | 1.3e-6
    "siamese_contrastive": (1e-4, 5e-3, True),  # 4.5e-6; 2.9e-6 | 3.4e-6
}

LR_LINE = re.compile(r"\] Iteration (\d+), lr = (\S+)$")
LOSS_LINE = re.compile(r"\] Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)$")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these nets are tiny, and on a shared 2-core machine OpenMP's spinning threads
    make them 5× slower. (The results do not depend on it: the measured errors are the same.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_tsv(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def rel_l2(ours: np.ndarray, caffe: np.ndarray) -> float:
    return float(np.linalg.norm(ours - caffe) / max(np.linalg.norm(caffe), 1e-30))


def assert_blobs(ours: np.ndarray, caffe: np.ndarray, bound: float, exact: bool, what: str) -> None:
    assert ours.shape == caffe.shape, f"{what}: shape {ours.shape} != Caffe's {caffe.shape}"
    err = rel_l2(ours, caffe)
    assert err <= bound, f"{what}: relative L2 error {err:.2e} > {bound:.0e}"
    if exact:
        scale = float(np.abs(caffe).max()) if caffe.size else 0.0
        np.testing.assert_allclose(ours, caffe, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{what} (see the module docstring about ReLU flips)")


@pytest.fixture()
def engine(request):
    """The convolution engine for the whole net (``--engine``), reset after the test."""
    from converter.layers.vision import set_net_engine

    set_net_engine(request.param)
    yield request.param
    set_net_engine(None)


# Caffe's own engine (im2col + GEMM) on the cases held to 1e-4 per element: same tolerances as torch's path
ENGINE_RUNS = [(case, "default") for case in CASES] + [
    (case, "caffe") for case in ("sgd_inv", "adam", "siamese_contrastive")]


@pytest.mark.parametrize("case, engine", ENGINE_RUNS, indirect=["engine"])
def test_golden_trajectory(case, engine, tmp_path, monkeypatch):
    folder = GOLDEN / case
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    loss_rtol, weight_bound, exact = CASES[case]
    monkeypatch.chdir(folder)
    sp = read_solver("solver.prototxt")
    sp.snapshot_prefix = str(tmp_path / "final")
    init = "init.caffemodel" if (folder / "init.caffemodel").exists() else "../_data/lenet_init.caffemodel"
    log = tmp_path / "train.log"
    trainer = run(sp, "solver.prototxt", TrainOptions(weights=[init], log=str(log), progress=False))

    # learning rates as printed, losses as computed
    printed_lr = {int(m[1]): m[2] for line in log.read_text().splitlines() if (m := LR_LINE.search(line))}
    printed_loss = {int(m[1]) for line in log.read_text().splitlines() if (m := LOSS_LINE.search(line))}
    ours = {r.iter: r.loss for r in trainer.records}
    rows = read_tsv(folder / "losses.tsv")
    assert sorted(ours) == [int(r[0]) for r in rows] == sorted(printed_loss)
    worst = 0.0
    for it, loss, *lr in rows:
        it = int(it)
        if lr and lr[0]:
            assert printed_lr.get(it) == lr[0], f"iteration {it}: lr {printed_lr.get(it)} != Caffe's {lr[0]}"
        worst = max(worst, abs(ours[it] - float(loss)) / abs(float(loss)))
    assert worst <= loss_rtol, f"worst loss relative error {worst:.2e}"

    if (folder / "tests.tsv").exists():
        expected = {(int(r[0]), int(r[1]), r[3]): float(r[4]) for r in read_tsv(folder / "tests.tsv")}
        got = {(it, k, name): v for it, k, name, v in trainer.tests}
        assert set(got) == set(expected)
        for key, v in expected.items():
            assert got[key] == pytest.approx(v, rel=max(loss_rtol, 2e-5), abs=1e-6), key

    n = sp.max_iter
    caffe_net = read_net(folder / f"final_iter_{n}.caffemodel")
    our_net = read_net(tmp_path / f"final_iter_{n}.caffemodel")
    assert [lp.name for lp in our_net.layer] == [lp.name for lp in caffe_net.layer]
    for theirs, mine in zip(caffe_net.layer, our_net.layer, strict=True):
        assert len(mine.blobs) == len(theirs.blobs), theirs.name
        for j, (a, b) in enumerate(zip(mine.blobs, theirs.blobs, strict=True)):
            assert_blobs(blob_to_array(a), blob_to_array(b), weight_bound, exact, f"{theirs.name} blob {j}")

    state_file = folder / f"final_iter_{n}.solverstate"
    if state_file.exists():
        theirs = read_binary(state_file, caffe_pb2.SolverState())
        mine = read_binary(tmp_path / f"final_iter_{n}.solverstate", caffe_pb2.SolverState())
        assert mine.iter == theirs.iter == n and mine.current_step == theirs.current_step
        assert mine.learned_net == str(tmp_path / f"final_iter_{n}.caffemodel")
        assert len(mine.history) == len(theirs.history)
        for i, (a, b) in enumerate(zip(mine.history, theirs.history, strict=True)):
            assert_blobs(blob_to_array(a), blob_to_array(b), weight_bound, exact, f"history {i}")
