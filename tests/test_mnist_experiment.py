"""The MNIST experiment driver end to end at its smallest scale: data, three pre-trainings, fine-tuning,
the results table and plots, and a rerun that reuses what is done."""

from __future__ import annotations

import csv

import pytest

from runner.experiments import mnist as experiment
from tests.test_mnist import mnist_dir


def test_smoke_scale_runs_end_to_end(tmp_path, capsys):
    argv = ["--scale", "smoke", "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"),
            "--mnist-dir", str(mnist_dir())]
    assert experiment.main(["eval", *argv]) == 2  # nothing pre-trained yet: one clear line
    assert "run `make train` first" in capsys.readouterr().err
    assert experiment.main(["train", *argv]) == 0
    runs = tmp_path / "runs" / "smoke"
    for method in ("egomotion", "sfa10", "sfa100"):
        assert (runs / method / "BEST").exists()
        assert (runs / method / "train.log").read_text().count("Iteration 0, Testing net (#0)") == 1
        solver = (runs / method / "solver.prototxt").read_text()
        assert "max_iter: 20" in solver and str(runs / method / "net.prototxt") in solver
    assert "margin: 100" in (runs / "sfa100" / "net.prototxt").read_text()
    # an interrupted pre-training (its last snapshot and marker gone) resumes from its newest snapshot
    for leftover in ("BEST", "snap_iter_20.caffemodel", "snap_iter_20.solverstate"):
        (runs / "sfa10" / leftover).unlink()
    capsys.readouterr()
    assert experiment.main(["train", *argv]) == 0
    assert "sfa10: resuming from snap_iter_10.solverstate" in capsys.readouterr().out
    log = (runs / "sfa10" / "train.log").read_text()
    assert "Restoring previous solver status from" in log and (runs / "sfa10" / "snap_iter_20.caffemodel").exists()
    assert (runs / "sfa10" / "BEST").read_text().strip().endswith(".caffemodel")
    # fine-tuning in two worker processes
    assert experiment.main(["eval", *argv, "--labels", "100", "--seeds", "1", "--jobs", "2"]) == 0
    rows = list(csv.DictReader(open(runs / "results.csv")))
    assert sorted(r["method"] for r in rows) == ["egomotion", "scratch", "sfa10", "sfa100"]
    for r in rows:
        assert 0.0 <= float(r["accuracy_full_test"]) <= 1.0
        # the thesis's measure is one batch of 125 digits: a multiple of 1/125
        assert float(r["accuracy_last_batch"]) * 125 == pytest.approx(round(float(r["accuracy_last_batch"]) * 125),
                                                                      abs=1e-3)
    scored = (runs / "finetune" / "egomotion_100_seed1" / "test.log").read_text()  # `caffe test`'s log
    assert "Batch 79, accuracy = " in scored and "Batch 80," not in scored
    table = (runs / "results.md").read_text()
    assert "| egomotion |" in table and "[0.75]" in table and "last test batch" in table
    assert "| labels | egomotion − scratch | egomotion − best SFA |" in table and "| 100 | " in table
    assert "more than 5 points from the thesis" in table
    assert (runs / "accuracy.png").stat().st_size > 1000 and (runs / "pretraining_loss.png").stat().st_size > 1000
    capsys.readouterr()
    assert experiment.main(["train", *argv]) == 0  # everything done before is reused, not redone
    out = capsys.readouterr().out
    assert "is ready" in out and out.count("done before") == 3


def test_best_snapshot_reads_every_display_of_a_resumed_run(tmp_path):
    """The thesis's best_snap: lowest smoothed training loss among the snapshots; a display repeated after
    a resume counts with its later value."""
    for it in (1000, 2000, 3000):
        (tmp_path / f"snap_iter_{it}.caffemodel").write_bytes(b"")
    (tmp_path / "train.csv").write_text(
        "iter,seconds,phase,name,value\n"
        "1000,1,train,smoothed_loss,0.5\n2000,2,train,smoothed_loss,0.2\n2500,3,train,smoothed_loss,0.1\n"
        "2000,4,train,smoothed_loss,0.9\n"  # resumed from 1000: iteration 2000 again, now worse
        "3000,5,train,smoothed_loss,0.4\n3000,5,test0,loss,0.01\n")
    assert experiment.best_snapshot(tmp_path, experiment.training_losses(tmp_path)).name == "snap_iter_3000.caffemodel"
    (tmp_path / "snap_iter_1000.solverstate").write_bytes(b"")
    (tmp_path / "snap_iter_3000.solverstate").write_bytes(b"")
    assert experiment.latest_solverstate(tmp_path).name == "snap_iter_3000.solverstate"


def test_comparison_lines_compute_the_acceptance_margins():
    def cell(*values):
        return [{"accuracy": v, "last_batch_accuracy": v} for v in values]

    table = {("egomotion", 100): cell(0.80, 0.70), ("scratch", 100): cell(0.50), ("sfa10", 100): cell(0.55),
             ("sfa100", 100): cell(0.58)}
    lines = experiment.comparison_lines(table, [100])
    assert "| 100 | +25.0 | +17.0 |" in lines  # 0.75 - 0.50 and 0.75 - max(0.55, 0.58)
    far = lines[-1]
    # thesis: scratch 0.42 (8 points off), SFA m=10 0.52 (3), SFA m=100 0.58 (0), egomotion 0.75 (0)
    assert "from scratch at 100: 0.500 vs 0.42" in far and "SFA" not in far and "egomotion" not in far
