"""The MNIST experiment's speed: the pair generator, and pre-training of the thesis's egomotion net.

* pairs/s of ``write_pair_lmdbs`` (OpenCV warps, both LMDBs, the manifest) on one core;
* training of ``prototxt/mnist/egomotion_train_val.prototxt`` at the thesis's batch of 125 pairs through
  the real loop (LMDB reading, transform, forward, backward, Caffe's SGD update): seconds per iteration
  measured over ``--iters`` iterations (default 500) after a warm-up, as the difference of two runs so
  that building the nets is not counted; the wall time of the thesis's 40,000 pre-training iterations
  extrapolated from it, beside BVLC Caffe's figure on this machine (``caffe-times.md``: 99.3 ms per
  forward+backward with 2 threads, no data, no update → about 66 minutes).

Writes a markdown table to stdout and ``benchmarks/results/mnist.{md,json}``.

    .venv/bin/python benchmarks/bench_mnist.py [--pairs N] [--iters N] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def bench_training(images, iters: int) -> dict:
    from converter import caffe_pb2
    from data_prep.mnist import write_pair_lmdbs
    from runner.experiments.mnist import fill_net, write_run

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_pair_lmdbs(images, 20_000, 0, d / "p", d / "l")
        sources = {("pairs", caffe_pb2.TRAIN): str(d / "p"), ("motion", caffe_pb2.TRAIN): str(d / "l"),
                   ("pairs", caffe_pb2.TEST): str(d / "p"), ("motion", caffe_pb2.TEST): str(d / "l")}
        net = fill_net("egomotion", sources, {caffe_pb2.TRAIN: 125, caffe_pb2.TEST: 125})
        write_run(d / "run", net, "egomotion", 0.01, 1, 1, 10**9, 10**9, seed=1701)
        train_seconds(d / "run", 5)  # warm-up: caches, allocator, MKL-DNN primitives
        short = train_seconds(d / "run", 10)
        long = train_seconds(d / "run", 10 + iters)
    per_iter = (long - short) / iters
    return {"iters": iters, "ms_per_iter": per_iter * 1e3, "pairs_per_s": 125 / per_iter,
            "thesis_pretraining_min": per_iter * THESIS_ITERS / 60, "caffe_ms_per_iter": CAFFE_MS,
            "caffe_pretraining_min": CAFFE_MS * THESIS_ITERS / 60e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mnist-dir", default=os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared/data/mnist"))
    args = parser.parse_args()
    import torch

    from data_prep.mnist import load_mnist

    torch.set_num_threads(args.threads)
    mnist = load_mnist(args.mnist_dir)
    gen = bench_generator(mnist.train_images, args.pairs)
    train = bench_training(mnist.train_images, args.iters)
    lines = ["# MNIST experiment speed", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} threads", "",
             "| measure | value |", "|---|---|",
             f"| pair generator (one core, both LMDBs + manifest) | {gen['pairs_per_s']:,.0f} pairs/s "
             f"({gen['pairs_per_cpu_s']:,.0f} per CPU-second) over {gen['pairs']:,} pairs |",
             f"| egomotion pre-training, batch 125 (data + forward + backward + update) | "
             f"{train['ms_per_iter']:.1f} ms/iter = {train['pairs_per_s']:,.0f} pairs/s "
             f"over {train['iters']} iterations |",
             f"| BVLC Caffe, same net (forward + backward only, 2 threads) | {CAFFE_MS} ms/iter |",
             f"| the thesis's 40,000 pre-training iterations, extrapolated | {train['thesis_pretraining_min']:.1f} min "
             f"(Caffe: {train['caffe_pretraining_min']:.0f} min; goal ≤ 20 min) |"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist.md").write_text(text)
    (out / "mnist.json").write_text(json.dumps({"generator": gen, "training": train, "threads": args.threads},
                                               indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
