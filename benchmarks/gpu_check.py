"""``make gpu-check``: Caffe's numbers and the training speed on a GPU, in one prepared script (issue 16, first part).

* the device and the versions;
* every golden training trajectory of ``../shared/reference/golden`` trained by ``egomotion train`` on the
  device, with cuDNN on (torch's default) and off (torch's own kernels, the closest to Caffe's
  ``engine: CAFFE``): the largest relative loss error against BVLC Caffe's ``losses.tsv``;
* the same trajectories with ``--cuda-graph`` (the pass captured as CUDA graphs), whose losses should be
  the eager cuDNN run's exactly;
* the MNIST egomotion net (the thesis's, batch 125) through the real training loop: milliseconds per
  iteration (eager, ``--engine caffe``, ``--cuda-graph``), as the difference of two runs so that building
  the nets is not counted;
* the same net's step (forward, backward, Caffe's SGD update) on one batch against the hand-written module
  of ``handwritten.py`` with ``torch.optim.SGD``, interleaved on the same device (issue 16's goal: <= 1.05x),
  the share of that step the GPU is busy (kernel time under torch's profiler), the kernels each step
  launches (on the CPU: the aten operators) against the hand-written step's, and the GEMM peak;
* the data path: MNIST pairs/s through ``NetFeeder`` with 0 and several worker processes, and the training
  step with workers against the step on a batch read beforehand (goal: wall <= compute + 5 %);
* ONNX Runtime's CUDA provider against torch on CUDA for the BCNN's probe features, where that provider is
  installed (otherwise the providers found are recorded); a one-process NCCL all-reduce.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, caffe_step, mnist_egomotion_run  # noqa: E402
from gemm_peak import gemm_runs  # noqa: E402

from tests.golden import LAYER_CASES  # noqa: E402

QUICK_CASES = ("sgd_inv", "adam")


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def trajectory(case: Path, gpu: str | None, iters: int | None, cuda_graph: bool = False) -> dict:
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
        trainer = run(sp, "solver.prototxt", TrainOptions(weights=[init], gpu=gpu, progress=False, quiet=True,
                                                          cuda_graph=cuda_graph))
    errors = {r.iter: abs(r.loss - caffe[r.iter]) / abs(caffe[r.iter]) for r in trainer.records if r.iter in caffe}
    worst = max(errors, key=errors.get)
    return {"iterations": len(errors), "max_rel_loss_error": errors[worst], "at_iteration": worst,
            "losses": [r.loss for r in trainer.records]}


def layer_case(folder: Path, gpu: str | None, engine: str | None) -> dict:
    """One golden layer case replayed by ``egomotion forward [--gpu 0] --backward --dump`` with Caffe's own
    inputs, weights and top diffs (the ``oracle_dump`` runs of its CASE.md): the largest relative error
    (``max |a - e| / max |e|`` per blob, -FLT_MAX and NaN exact) of the forward blobs and of the bottom and
    parameter diffs against BVLC Caffe's."""
    from runner.cli import main as egomotion
    from runner.ort import max_rel_error
    from tests.golden import oracle_runs

    worst = {"forward": 0.0, "backward": 0.0, "blobs": 0}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(folder):
        for n, run in enumerate(oracle_runs(folder)):
            out = Path(tmp) / str(n)
            argv = ["forward", "--model", run["model"], "--phase", run["phase"], "--weights", run["weights"],
                    "--dump", str(out)] + (["--backward"] if run["backward"] else []) + \
                (["--gpu", gpu] if gpu is not None else []) + (["--engine", engine] if engine else [])
            for flag, pairs in (("--input", run["inputs"]), ("--top-diff", run["top_diffs"])):
                for name, path in pairs.items():
                    argv += [flag, f"{name}={path}"]
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = egomotion(argv)
                except SystemExit as e:  # argparse refusing the command line: this case fails, the check goes on
                    code = e.code
            if code:
                raise RuntimeError((err.getvalue().strip().splitlines() or [f"exit code {code}"])[-1])
            for kind, sub, key in (("blobs", "", "forward"), ("diffs", "diffs", "backward"),
                                   ("param_diffs", "param_diffs", "backward")):
                for ours in sorted((out / sub).glob("*.npy")):
                    expected = folder / kind / ours.name
                    if expected.exists():
                        caffe = np.load(expected)
                        worst[key] = max(worst[key], max_rel_error(np.load(ours).reshape(caffe.shape), caffe))
                        worst["blobs"] += 1
    return worst


def step_ms(images, gpu: str | None, iters: int, cuda_graph: bool = False) -> float:
    """Milliseconds per training iteration of the MNIST egomotion net (batch 125), data path included."""
    from converter.io import read_solver
    from runner.train import TrainOptions, run

    def seconds(folder: Path, n: int) -> float:
        sp = read_solver(folder / "solver.prototxt")
        sp.max_iter, sp.snapshot_after_train = n, False
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            run(sp, str(folder / "solver.prototxt"), TrainOptions(gpu=gpu, progress=False, quiet=True,
                                                                  cuda_graph=cuda_graph))
        if gpu is not None:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        folder = mnist_egomotion_run(Path(tmp), images, 5_000).parent
        seconds(folder, 5)  # warm-up: kernels, allocator, caches
        return (seconds(folder, 10 + iters) - seconds(folder, 10)) / iters * 1e3


def _timed(fn, iters: int, gpu: str | None) -> float:
    """ms per call of ``fn`` over ``iters`` calls, the device waited for at the end."""
    if gpu is not None:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if gpu is not None:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def eager_vs_handwritten(prototxt: Path, gpu: str | None, iters: int) -> dict:
    """Our step against the hand-written module's on one batch, same weights and device, interleaved (3
    rounds, medians), and what each step launches (:func:`launch_profile`: on a GPU with the share of the
    step the GPU is busy)."""
    import handwritten
    from bench_converter import make_inputs

    from converter import caffe_pb2
    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet
    from runner.solver import Solver

    device = torch.device("cuda", 0) if gpu is not None else torch.device("cpu")
    name = prototxt.stem
    net = CaffeNet(filter_net(read_net(prototxt), net_state("TRAIN")))
    hand = handwritten.build(name).train()
    handwritten.copy_from_caffe(hand, net, name)
    net.to(device)
    hand.to(device)
    inputs = make_inputs(net, torch.Generator().manual_seed(1), device)
    sp = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed")
    solver = Solver(sp, list(net.params), [lb.lr_mult for lb in net.learnable], [lb.decay_mult for lb in net.learnable])
    opt = torch.optim.SGD(hand.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)

    def ours() -> None:
        caffe_step(net, solver, inputs, gpu is not None)

    def theirs() -> None:
        opt.zero_grad(set_to_none=False)
        hand(inputs).backward()
        opt.step()

    for fn in (ours, theirs):  # warm-up: kernels, allocator, cuDNN's algorithm search
        _timed(fn, 5, gpu)
    times = {"ours": [], "handwritten": []}
    for _ in range(3):
        times["ours"].append(_timed(ours, iters, gpu))
        times["handwritten"].append(_timed(theirs, iters, gpu))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["ours"] / out["handwritten"]
    out["launches"] = {"ours": launch_profile(ours, min(iters, 50), gpu),
                       "handwritten": launch_profile(theirs, min(iters, 50), gpu)}
    return out


def launch_profile(fn, iters: int, gpu: str | None, top: int = 8) -> dict:
    """What one call of ``fn`` launches, under torch's profiler: on a GPU the CUDA kernels per call, the share
    of the wall time they keep the GPU busy (the profiler slows the host side, so a lower bound) and the most
    frequent kernels; on the CPU the aten operators that do the work (those with no aten operator below
    them, views included) per call and the most frequent. Where our step and the hand-written one differ in
    these counts is where an eager GPU step loses time to launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu is not None else [])
    with profile(activities=activities) as prof:
        wall = _timed(fn, iters, gpu) * iters
    counts: dict[str, int] = {}
    busy_us = 0.0
    if gpu is not None:
        for event in prof.key_averages():
            if str(getattr(event, "device_type", "")).endswith("CUDA"):
                counts[event.key] = event.count
                busy_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    else:
        for event in prof.events():
            if event.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in event.cpu_children):
                counts[event.name] = counts.get(event.name, 0) + 1
    out = {"unit": "CUDA kernels" if gpu is not None else "leaf aten operators",
           "per_step": sum(counts.values()) / iters,
           "most_frequent": {k: v / iters for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]}}
    if gpu is not None:
        out["gpu_busy_share"] = busy_us / 1e3 / wall
    return out


def data_path(images, gpu: str | None, quick: bool) -> dict:
    """MNIST pairs/s through NetFeeder by worker count, and the step's wall against its compute with workers."""
    from bench_data_path import pairs_per_second, step_ms

    cpus = len(os.sched_getaffinity(0))
    counts = [0, 1] if quick else sorted({0, 2, min(4, cpus - 1), min(8, cpus - 1)})
    out: dict = {"cpus": cpus, "pairs_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        solver = mnist_egomotion_run(Path(tmp), images, 2_000 if quick else 20_000)
        for workers in counts:
            out["pairs_per_s"][workers] = pairs_per_second(solver, workers, 5 if quick else 100)
        workers = counts[-1]
        wall, compute = step_ms(solver, workers, 3 if quick else 100, threads=1 if quick else cpus, gpu=gpu)
        out["step"] = {"workers": workers, "wall_ms": wall, "compute_ms": compute, "ratio": wall / compute}
    return out


def ort_vs_torch(gpu: str | None) -> dict:
    """ONNX Runtime's CUDA provider against torch on CUDA for the BCNN's probe features (images/s), where
    that provider is installed; otherwise the providers found."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if gpu is None or "CUDAExecutionProvider" not in providers:
        return {"providers": providers, "skipped": "no GPU" if gpu is None else
                "onnxruntime here has no CUDAExecutionProvider (a CPU-only build)"}
    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet
    from runner.deploy import deploy_net
    from runner.export import export_model, rebatch
    from runner.probe import open_session

    blobs, batch = ["norm1", "norm2", "conv3", "conv4", "conv5"], 64
    proto = filter_net(read_net(ROOT / "prototxt" / "kitti" / "bcnn_deploy.prototxt"), net_state("TEST"))
    plan = deploy_net(proto, blobs, {"data": (batch, 3, 227, 227)})
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bcnn.onnx"
        export_model(net, plan, path)
        session = open_session(path, "cuda")
        module = rebatch(net, plan, batch).to("cuda")
        x = torch.randn(batch, 3, 227, 227, generator=torch.Generator().manual_seed(2))
        xc, xn = x.cuda(), x.numpy()

        def run_torch() -> None:
            with torch.no_grad():
                out = module({"data": xc})
                [out[b].cpu() for b in blobs]  # the features end on the host, as ORT's do

        def run_ort() -> None:
            session.run(blobs, {"data": xn})

        for f in (run_ort, run_torch):  # warm-up
            _timed(f, 3, "0")
        ort_ms, torch_ms = _timed(run_ort, 20, "0"), _timed(run_torch, 20, "0")
    return {"providers": providers, "used": session.get_providers()[0], "batch": batch,
            "ort_images_per_s": batch / ort_ms * 1e3, "torch_images_per_s": batch / torch_ms * 1e3}


def nccl_one_process() -> dict:
    """A one-process NCCL group on GPU 0: an all-reduce of 4 MiB, checked and timed."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        t = torch.ones(1 << 20, device="cuda")
        dist.all_reduce(t)
        ms = _timed(lambda: dist.all_reduce(t), 20, "0")
        ok = bool((t == 1).all())
        dist.destroy_process_group()
        return {"ok": ok, "all_reduce_4MiB_ms": ms, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    except Exception as e:  # noqa: BLE001 - recorded, not fatal: the rest of the check still counts
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="two trajectories, few iterations (the test suite)")
    parser.add_argument("--golden", default=str(ROOT.parent / "shared" / "reference" / "golden"))
    parser.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--timing", default=str(ROOT.parent / "shared" / "reference" / "timing"),
                        help="the timing nets (thesis_mnist_egomotion_b125.prototxt) for the hand-written comparison")
    parser.add_argument("--out", default=None, help="the JSON to write (default benchmarks/results/gpu[_quick].json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but PyTorch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    gpu = "0" if args.device == "cuda" else None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # Caffe's true float32
    record: dict = {"versions": versions(args.device), "trajectories": {}, "layer_cases": {}}
    golden = Path(args.golden).resolve()  # the trajectories run from inside each case folder
    cases = sorted(p.name for p in golden.iterdir() if (p / "losses.tsv").exists()) if golden.is_dir() else []
    if args.quick:
        cases = [c for c in cases if c in QUICK_CASES]
    from converter.layers.vision import set_net_engine

    # (cuDNN enabled, --engine): torch's convolution with cuDNN's algorithms, torch's own kernels, and
    # Caffe's engine (im2col + cuBLAS GEMM, converter/layers/vision.py im2col_conv)
    # and, with --cuda-graph, the cuDNN pass captured as CUDA graphs (its losses should be the eager ones)
    modes = {"cudnn": (True, None, False), "native": (False, None, False), "caffe_engine": (True, "caffe", False),
             "cudnn_graph": (True, None, True)} if gpu else \
        {"cpu": (True, None, False), "cpu_caffe_engine": (True, "caffe", False)}
    for mode, (cudnn, engine, graph) in modes.items():
        torch.backends.cudnn.enabled = cudnn
        set_net_engine(engine)
        for case in cases:
            try:
                result = trajectory(golden / case, gpu, 5 if args.quick else None, graph)
            except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others' figures
                result = {"error": f"{type(e).__name__}: {e}", "max_rel_loss_error": math.inf, "at_iteration": -1}
            record["trajectories"].setdefault(case, {})[mode] = result
        for case in LAYER_CASES if golden.is_dir() and not graph else []:  # --cuda-graph is for training
            try:
                result = layer_case(golden / case, gpu, engine)
            except Exception as e:  # noqa: BLE001 - recorded; the other cases and modes still count
                result = {"error": f"{type(e).__name__}: {e}", "forward": math.inf, "backward": math.inf}
            record["layer_cases"].setdefault(case, {})[mode] = result
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
        if gpu is not None:
            try:
                record["mnist_step_ms_cuda_graph"] = step_ms(images, gpu, 200, cuda_graph=True)
            except Exception as e:  # noqa: BLE001 - recorded; the rest of the check still counts
                record["mnist_step_ms_cuda_graph"] = f"{type(e).__name__}: {e}"
        record["data_path"] = data_path(images, gpu, args.quick)
    timing = Path(args.timing) / "thesis_mnist_egomotion_b125.prototxt"
    if timing.exists():
        record["eager_vs_handwritten"] = eager_vs_handwritten(timing, gpu, 3 if args.quick else 200)
    record["gemm_peak_gflops"] = statistics.median(gemm_runs(512 if args.quick else 8192, 3, device=args.device))
    record["ort"] = ort_vs_torch(gpu)
    record["nccl"] = nccl_one_process() if gpu else {"skipped": "no GPU"}
    worst = {mode: max((t[mode]["max_rel_loss_error"] for t in record["trajectories"].values()), default=math.nan)
             for mode in modes}
    if gpu is not None:  # captured against eager: the same kernels, so the same losses?
        record["cuda_graph_equal_to_eager"] = {case: t["cudnn_graph"].get("losses") == t["cudnn"].get("losses")
                                               for case, t in record["trajectories"].items()}
    record["worst_rel_loss_error"] = worst
    out = Path(args.out) if args.out else RESULTS / ("gpu_quick.json" if args.quick else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"benchmark": "gpu_check", "device": args.device, "worst_rel_loss_error": worst,
                      "mnist_step_ms": record.get("mnist_step_ms")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
