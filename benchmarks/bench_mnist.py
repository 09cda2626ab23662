"""The MNIST experiment's speed: the pair generator, and pre-training of the thesis's egomotion net.

* pairs/s of ``write_pair_lmdbs`` (OpenCV warps, both LMDBs, the manifest) on one core, ``--runs`` times;
* training of ``prototxt/mnist/egomotion_train_val.prototxt`` at the thesis's batch of 125 pairs through
  the real loop (LMDB reading, transform, forward, backward, Caffe's SGD update): seconds per iteration
  measured over ``--iters`` iterations (default 200) after a warm-up, as the difference of two runs so
  that building the nets is not counted, ``--runs`` times (default 3); beside it the hand-written module of
  the same net with ``torch.optim.SGD`` on one batch in memory, measured in the same run, and the time the
  net's FLOPs would take at the machine's GEMM peak; the wall time of the thesis's 40,000 pre-training
  iterations extrapolated from it, beside BVLC Caffe's figure on this machine (``caffe-times.md``: 99.3 ms per
  forward+backward with 2 threads, no data, no update → about 66 minutes).

Writes ``benchmarks/results/mnist.{md,json}`` (the table also to stderr) and prints one JSON line.

    .venv/bin/python benchmarks/bench_mnist.py [--pairs N] [--iters N] [--runs N] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

from common import emit, figure, mnist_egomotion_run, net_forward_flops, ref  # noqa: E402
from gemm_peak import peak_gflops  # noqa: E402

CAFFE_MS = 99.3  # caffe time, thesis_mnist_egomotion_b125, 2 threads (caffe-times.md)
THESIS_ITERS = 40_000


def bench_generator(images, pairs: int) -> dict:
    import cv2

    from data_prep.mnist import write_pair_lmdbs

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as d:
        start, cpu = time.perf_counter(), time.process_time()
        write_pair_lmdbs(images, pairs, 0, Path(d) / "p", Path(d) / "l", Path(d) / "m.tsv")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"pairs": pairs, "pairs_per_s": pairs / wall, "pairs_per_cpu_s": pairs / cpu}


def train_seconds(folder: Path, iters: int) -> float:
    from converter.io import read_solver
    from runner.train import TrainOptions, run

    sp = read_solver(folder / "solver.prototxt")
    sp.max_iter = iters
    sp.snapshot_after_train = False
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        run(sp, str(folder / "solver.prototxt"), TrainOptions())
    return time.perf_counter() - start


def bench_training(images, iters: int, runs: int) -> dict:
    samples = []
    with tempfile.TemporaryDirectory() as d:
        run = mnist_egomotion_run(Path(d), images, 20_000).parent
        train_seconds(run, 5)  # warm-up: caches, allocator, MKL-DNN primitives
        for _ in range(runs):
            short = train_seconds(run, 10)
            long = train_seconds(run, 10 + iters)
            samples.append((long - short) / iters * 1e3)
    per_iter = statistics.median(samples) / 1e3
    return {"iters": iters, "runs": runs, "ms_per_iter": per_iter * 1e3, "ms_per_iter_samples": samples,
            "pairs_per_s": 125 / per_iter, "thesis_pretraining_min": per_iter * THESIS_ITERS / 60,
            "caffe_ms_per_iter": CAFFE_MS, "caffe_pretraining_min": CAFFE_MS * THESIS_ITERS / 60e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000, help="pairs per generator run")
    parser.add_argument("--iters", type=int, default=200, help="measured training iterations per run")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mnist-dir", default=os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared/data/mnist"))
    args = parser.parse_args()
    import torch
    from profile_mnist import time_handwritten

    from data_prep.mnist import load_mnist

    torch.set_num_threads(args.threads)
    mnist = load_mnist(args.mnist_dir)
    gens = [bench_generator(mnist.train_images, args.pairs) for _ in range(args.runs)]
    gen = {"pairs": args.pairs, "runs": args.runs, "pairs_per_s": statistics.median(g["pairs_per_s"] for g in gens),
           "pairs_per_cpu_s": statistics.median(g["pairs_per_cpu_s"] for g in gens),
           "pairs_per_s_samples": [g["pairs_per_s"] for g in gens]}
    train = bench_training(mnist.train_images, args.iters, args.runs)
    hand = time_handwritten(args.iters)  # the same net hand-written, torch.optim.SGD, one batch in memory
    hand_ms = statistics.median(hand["total"])
    flops = 3 * net_forward_flops(_timing_net())
    peak = peak_gflops(args.threads)
    lines = ["# MNIST experiment speed", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} threads; medians of {args.runs} runs (min-max)", "",
             "| measure | value |", "|---|---|",
             f"| pair generator (one core, both LMDBs + manifest) | {gen['pairs_per_s']:,.0f} pairs/s "
             f"({min(gen['pairs_per_s_samples']):,.0f}-{max(gen['pairs_per_s_samples']):,.0f}; "
             f"{gen['pairs_per_cpu_s']:,.0f} per CPU-second) over {gen['pairs']:,} pairs |",
             f"| egomotion pre-training, batch 125 (data + forward + backward + update) | "
             f"{train['ms_per_iter']:.1f} ms/iter ({min(train['ms_per_iter_samples']):.1f}-"
             f"{max(train['ms_per_iter_samples']):.1f}) = {train['pairs_per_s']:,.0f} pairs/s "
             f"over {train['iters']} iterations |",
             f"| hand-written PyTorch module + torch.optim.SGD, one batch in memory (same run) | "
             f"{hand_ms:.1f} ms/iter |",
             f"| BVLC Caffe, same net (forward + backward only, 2 threads) | {CAFFE_MS} ms/iter |",
             f"| GEMM peak of this machine ({args.threads} threads, same run) | {peak:.0f} GFLOP/s: "
             f"{flops / 1e9:.2f} GFLOP per iteration would take {flops / peak / 1e6:.1f} ms |",
             f"| the thesis's 40,000 pre-training iterations, extrapolated | {train['thesis_pretraining_min']:.1f} min "
             f"(Caffe: {train['caffe_pretraining_min']:.0f} min; goal ≤ 20 min) |"]
    text = "\n".join(lines) + "\n"
    print(text, file=sys.stderr)
    figures = [
        figure("MNIST pair generator (one core)", gen["pairs_per_s_samples"], "pairs/s", higher_is_better=True),
        figure(f"egomotion pre-training iteration, batch 125, {args.threads} threads", train["ms_per_iter_samples"],
               "ms", ref("hand-written module + torch.optim.SGD", "measured", hand_ms),
               ref(f"BVLC Caffe forward+backward, {args.threads} threads", "caffe", CAFFE_MS),
               ref(f"3x forward FLOPs at the GEMM peak ({peak:.0f} GFLOP/s)", "measured", flops / peak / 1e6)),
    ]
    emit("mnist", figures, {"generator": gen, "training": train, "handwritten_ms": hand_ms, "threads": args.threads,
                            "gemm_peak_gflops": peak}, text)
    return 0


def _timing_net():
    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet

    return CaffeNet(filter_net(read_net(ROOT.parent / "shared" / "reference" / "timing" /
                                        "thesis_mnist_egomotion_b125.prototxt"), net_state("TRAIN")))


if __name__ == "__main__":
    sys.exit(main())
