"""``make gpu-check``'s script in its CPU mode (``--device cpu --quick``), so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.golden import GOLDEN

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_quick_mode(tmp_path):
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} is absent")
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["trajectories"]) == {"sgd_inv", "adam"}
    for case in record["trajectories"].values():
        for mode in ("cpu", "cpu_caffe_engine"):  # torch's convolution and Caffe's im2col + GEMM engine
            assert case[mode]["iterations"] == 6 and case[mode]["max_rel_loss_error"] < 1e-4  # Caffe's losses
    from tests.golden import LAYER_CASES

    assert list(record["layer_cases"]) == LAYER_CASES  # each replayed by `egomotion forward --backward`
    for case in record["layer_cases"].values():
        for mode in ("cpu", "cpu_caffe_engine"):
            assert case[mode]["blobs"] > 0 and case[mode]["forward"] < 1e-5 and case[mode]["backward"] < 1e-4
    if (ROOT.parent / "shared" / "data" / "mnist").is_dir():
        assert record["mnist_step_ms"] > 0 and record["mnist_step_ms_caffe_engine"] > 0
        data = record["data_path"]
        assert set(data["pairs_per_s"]) == {"0", "1"} and min(data["pairs_per_s"].values()) > 0
        assert data["step"]["workers"] == 1 and data["step"]["ratio"] > 0
    if (ROOT.parent / "shared" / "reference" / "timing").is_dir():
        eager = record["eager_vs_handwritten"]
        assert eager["ratio"] > 0
        for step in eager["launches"].values():  # the operators each step runs, ours and the hand-written one's
            assert step["unit"] == "leaf aten operators" and step["per_step"] > 50
            assert all(name.startswith("aten::") for name in step["most_frequent"])
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from report import gpu_section

        text = "\n".join(gpu_section(record))
        assert "| lrn | " in text
        assert f"Leaf aten operators per step: ours {eager['launches']['ours']['per_step']:.0f}" in text
    assert record["gemm_peak_gflops"] > 0 and record["nccl"] == {"skipped": "no GPU"}
    assert record["ort"]["skipped"] == "no GPU" and "CPUExecutionProvider" in record["ort"]["providers"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["benchmark"] == "gpu_check"


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "sees no CUDA device" in done.stderr and not (tmp_path / "x.json").exists()
