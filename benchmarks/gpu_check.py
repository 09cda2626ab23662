"""``make gpu-check``: Caffe's numbers and the training speed on a GPU, in one prepared script (issue 16, first part).

* the device and the versions;
* every golden training trajectory of ``../shared/reference/golden`` trained by ``egomotion train`` on the
  device, with cuDNN on (torch's default) and off (torch's own kernels, the closest to Caffe's
  ``engine: CAFFE``): the largest relative loss error against BVLC Caffe's ``losses.tsv``;
* the MNIST egomotion net (the thesis's, batch 125) through the real training loop: milliseconds per
  iteration, as the difference of two runs so that building the nets is not counted.

``--device cpu --quick`` runs the same on the CPU with two trajectories and few iterations (the test suite
runs it so the script cannot rot). Writes ``benchmarks/results/gpu.json`` (``gpu_quick.json`` with --quick)
and prints one JSON line. Data come from ``--golden`` / ``--mnist`` (default ``../shared/…``).

    .venv/bin/python benchmarks/gpu_check.py [--device cuda|cpu] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, mnist_egomotion_run  # noqa: E402

QUICK_CASES = ("sgd_inv", "adam")


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def trajectory(case: Path, gpu: str | None, iters: int | None) -> dict:
    """One golden case trained here; the largest relative loss error against Caffe's, per iteration."""
    from converter.io import read_solver
    from runner.train import TrainOptions, run

    sp = read_solver(case / "solver.prototxt")
    caffe = {int(row.split("\t")[0]): float(row.split("\t")[1])
             for row in (case / "losses.tsv").read_text().splitlines()[1:] if row}
    if iters:
        sp.max_iter = min(sp.max_iter, iters)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(case), contextlib.redirect_stderr(io.StringIO()):
        sp.snapshot_prefix = str(Path(tmp) / "final")
        init = "init.caffemodel" if (case / "init.caffemodel").exists() else "../_data/lenet_init.caffemodel"
        trainer = run(sp, "solver.prototxt", TrainOptions(weights=[init], gpu=gpu, progress=False, quiet=True))
    errors = {r.iter: abs(r.loss - caffe[r.iter]) / abs(caffe[r.iter]) for r in trainer.records if r.iter in caffe}
    worst = max(errors, key=errors.get)
    return {"iterations": len(errors), "max_rel_loss_error": errors[worst], "at_iteration": worst}


def step_ms(images, gpu: str | None, iters: int) -> float:
    """Milliseconds per training iteration of the MNIST egomotion net (batch 125), data path included."""
    from converter.io import read_solver
    from runner.train import TrainOptions, run

    def seconds(folder: Path, n: int) -> float:
        sp = read_solver(folder / "solver.prototxt")
        sp.max_iter, sp.snapshot_after_train = n, False
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            run(sp, str(folder / "solver.prototxt"), TrainOptions(gpu=gpu, progress=False, quiet=True))
        if gpu is not None:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        folder = mnist_egomotion_run(Path(tmp), images, 5_000).parent
        seconds(folder, 5)  # warm-up: kernels, allocator, caches
        return (seconds(folder, 10 + iters) - seconds(folder, 10)) / iters * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="two trajectories, few iterations (the test suite)")
    parser.add_argument("--golden", default=str(ROOT.parent / "shared" / "reference" / "golden"))
    parser.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--out", default=None, help="the JSON to write (default benchmarks/results/gpu[_quick].json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but PyTorch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    gpu = "0" if args.device == "cuda" else None
    record: dict = {"versions": versions(args.device), "trajectories": {}}
    golden = Path(args.golden).resolve()  # the trajectories run from inside each case folder
    cases = sorted(p.name for p in golden.iterdir() if (p / "losses.tsv").exists()) if golden.is_dir() else []
    if args.quick:
        cases = [c for c in cases if c in QUICK_CASES]
    from converter.layers.vision import set_net_engine

    # (cuDNN enabled, --engine): torch's convolution with cuDNN's algorithms, torch's own kernels, and
    # Caffe's engine (im2col + cuBLAS GEMM, converter/layers/vision.py im2col_conv)
    modes = {"cudnn": (True, None), "native": (False, None), "caffe_engine": (True, "caffe")} if gpu else \
        {"cpu": (True, None), "cpu_caffe_engine": (True, "caffe")}
    for mode, (cudnn, engine) in modes.items():
        torch.backends.cudnn.enabled = cudnn
        set_net_engine(engine)
        for case in cases:
            result = trajectory(golden / case, gpu, 5 if args.quick else None)
            record["trajectories"].setdefault(case, {})[mode] = result
    torch.backends.cudnn.enabled = True
    set_net_engine(None)
    mnist = Path(args.mnist).resolve()
    if mnist.is_dir():
        from data_prep.mnist import load_mnist

        images = load_mnist(str(mnist)).train_images
        record["mnist_step_ms"] = step_ms(images, gpu, 3 if args.quick else 200)
        record["mnist_40k_minutes"] = record["mnist_step_ms"] * 40_000 / 60e3
        set_net_engine("caffe")
        try:
            record["mnist_step_ms_caffe_engine"] = step_ms(images, gpu, 3 if args.quick else 200)
        finally:
            set_net_engine(None)
    worst = {mode: max((t[mode]["max_rel_loss_error"] for t in record["trajectories"].values()), default=math.nan)
             for mode in modes}
    record["worst_rel_loss_error"] = worst
    out = Path(args.out) if args.out else RESULTS / ("gpu_quick.json" if args.quick else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"benchmark": "gpu_check", "device": args.device, "worst_rel_loss_error": worst,
                      "mnist_step_ms": record.get("mnist_step_ms")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
