"""Whole golden layer cases through CaffeNet: BVLC Caffe's forward blobs, diffs and param diffs.

Each case's CASE.md holds the exact ``oracle_dump`` command lines Caffe was run with; they are parsed
here and replayed with our net (and, for one case, with ``egomotion forward``), so the inputs, top
diffs, weights and phase are exactly Caffe's.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from converter.io import filter_net, net_state, read_net
from converter.net import CaffeNet
from converter.weights import load_weights
from runner.forward import file_name, run_forward
from tests import golden
from tests.golden import BWD_ATOL, BWD_RTOL, FWD_ATOL, FWD_RTOL, GOLDEN, assert_close, require_golden


def replay(case: str, run: dict, monkeypatch) -> tuple:
    folder = GOLDEN / case
    monkeypatch.chdir(folder)  # relative paths (infogain H) resolve as they did for Caffe
    proto = filter_net(read_net(folder / run["model"]), net_state(run["phase"]))
    inputs = {k: torch.from_numpy(np.load(folder / p)) for k, p in run["inputs"].items()}
    net = CaffeNet(proto, {k: tuple(v.shape) for k, v in inputs.items()})
    load_weights(net, folder / run["weights"])
    top_diffs = {k: torch.from_numpy(np.load(folder / p)) for k, p in run["top_diffs"].items()}
    return net, run_forward(net, inputs, run["backward"], top_diffs)


@pytest.fixture()
def engine(request):
    """The Convolution engine of the whole net (``--engine``), reset after the test."""
    from converter.layers.vision import set_net_engine

    set_net_engine(request.param)
    yield request.param
    set_net_engine(None)


@pytest.mark.parametrize("case, engine", [(case, "default") for case in golden.LAYER_CASES] + [("conv", "caffe")],
                         indirect=["engine"])
def test_golden_case_through_the_net(case, engine, monkeypatch):
    """Every case with torch's layers; the convolution case also with Caffe's im2col + GEMM engine."""
    require_golden()
    runs = golden.oracle_runs(GOLDEN / case)
    assert runs, f"{case}: no oracle_dump command found in CASE.md"
    for run in runs:
        net, (blobs, blob_diffs, param_diffs, loss) = replay(case, run, monkeypatch)
        folder = GOLDEN / case
        stem = run["model"].removesuffix(".prototxt")
        expected_loss = float((folder / f"loss_{stem}.txt").read_text().split()[0])
        assert float(loss) == pytest.approx(expected_loss, rel=FWD_RTOL, abs=FWD_ATOL), f"{case}: loss"
        compared = 0
        for name, value in blobs.items():
            path = folder / "blobs" / f"{file_name(name)}.npy"
            assert path.exists(), f"{case}: Caffe wrote no blob {name}"
            assert_close(value, np.load(path), f"{case}/{stem}: blob {name}", FWD_RTOL, FWD_ATOL)
            compared += 1
        for name, value in blob_diffs.items():
            path = folder / "diffs" / f"{file_name(name)}.npy"
            if path.exists():
                assert_close(value, np.load(path), f"{case}/{stem}: diff {name}", BWD_RTOL, BWD_ATOL)
                compared += 1
        for key, value in param_diffs.items():
            path = folder / "param_diffs" / f"{file_name(key)}.npy"
            if path.exists():
                assert_close(value, np.load(path).reshape(value.shape), f"{case}/{stem}: param diff {key}",
                             BWD_RTOL, BWD_ATOL)
                compared += 1
        if run["backward"]:
            # params/ hold values after forward (BatchNorm's moving averages): compare them too
            for lp, uses in zip(net.layer_params, net.blob_uses, strict=True):
                for j, use in enumerate(uses):
                    path = folder / "params" / f"{file_name(lp.name)}.{j}.npy"
                    if path.exists():
                        value = net.params[use.learnable].detach().reshape(use.shape)
                        assert_close(value, np.load(path).reshape(use.shape), f"{case}: param {lp.name}.{j}",
                                     FWD_RTOL, FWD_ATOL)
        assert compared >= len(blobs)


def test_forward_cli_reproduces_the_conv_case(tmp_path, monkeypatch):
    from runner.cli import main

    require_golden()
    (run,) = golden.oracle_runs(GOLDEN / "conv")
    folder = GOLDEN / "conv"
    monkeypatch.chdir(folder)
    argv = ["forward", "--model", run["model"], "--phase", run["phase"], "--weights", run["weights"],
            "--backward", "--dump", str(tmp_path / "out")]
    for name, path in run["inputs"].items():
        argv += ["--input", f"{name}={path}"]
    for name, path in run["top_diffs"].items():
        argv += ["--top-diff", f"{name}={path}"]
    assert main(argv) == 0
    for kind, sub in (("blobs", ""), ("diffs", "diffs"), ("param_diffs", "param_diffs")):
        expected_files = sorted(p.name for p in (folder / kind).glob("*.npy"))
        got_files = sorted(p.name for p in (tmp_path / "out" / sub).glob("*.npy"))
        assert got_files == expected_files, kind
        for name in expected_files:
            rtol, atol = (FWD_RTOL, FWD_ATOL) if kind == "blobs" else (BWD_RTOL, BWD_ATOL)
            assert_close(np.load(tmp_path / "out" / sub / name), np.load(folder / kind / name),
                         f"{kind}/{name}", rtol, atol)


def test_forward_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from runner.cli import main

    require_golden()
    monkeypatch.chdir(GOLDEN / "conv")
    assert main(["forward", "--model", "net.prototxt", "--dump", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"egomotion forward: error: net\.prototxt: no --input given for data blob\(s\) .*", err)


def test_forward_cli_reads_data_layers_bit_exact_on_the_transformer_case(tmp_path, monkeypatch):
    """`egomotion forward` with no --input reads each Data layer's first batch from its LMDB and transforms it
    as Caffe's DataTransformer: BVLC Caffe's own blobs, bit for bit."""
    from runner.cli import main

    require_golden()
    folder = GOLDEN / "transformer"
    monkeypatch.chdir(folder)
    assert main(["forward", "--model", "net.prototxt", "--phase", "TEST", "--dump", str(tmp_path / "out")]) == 0
    for path in sorted((folder / "blobs").glob("*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / path.name), np.load(path), err_msg=path.name)


def test_forward_cli_dumps_parameters_after_the_pass(tmp_path, monkeypatch):
    """params/<layer>.<i>.npy hold the values after the pass: BatchNorm's running statistics in TRAIN, as the
    golden bn case's params/ (Caffe's own)."""
    from runner.cli import main

    require_golden()
    runs = [r for r in golden.oracle_runs(GOLDEN / "bn") if r["phase"] == "TRAIN" and r["backward"]]
    if not runs:
        pytest.skip("no TRAIN run in the bn case")
    run = runs[0]
    folder = GOLDEN / "bn"
    monkeypatch.chdir(folder)
    argv = ["forward", "--model", run["model"], "--phase", "TRAIN", "--weights", run["weights"], "--backward",
            "--dump", str(tmp_path / "out")]
    for name, path in run["inputs"].items():
        argv += ["--input", f"{name}={path}"]
    for name, path in run["top_diffs"].items():
        argv += ["--top-diff", f"{name}={path}"]
    assert main(argv) == 0
    ours_files = {p.name for p in (tmp_path / "out" / "params").glob("*.npy")}
    expected = sorted(p.name for p in (folder / "params").glob("*.npy") if p.name in ours_files)
    assert {"bn_train.0.npy", "bn_train.1.npy", "bn_train.2.npy"} <= set(expected), expected  # mean, var, factor
    for name in expected:
        ours = np.load(tmp_path / "out" / "params" / name)
        assert_close(ours, np.load(folder / "params" / name).reshape(ours.shape), f"params/{name}", FWD_RTOL, FWD_ATOL)
