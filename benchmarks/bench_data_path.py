"""The data path alone: how many pairs per second the Data layers deliver, without a net.

The MNIST egomotion run's train net (the experiment's files, SCALE=full, batch 125 pairs and their labels,
two Data layers in lock-step) is read through ``runner.data.NetFeeder``, the path ``egomotion train``
uses: LMDB reads, Datum decoding, Caffe's transform, the batch tensors; with the reading in this process
(``--workers 0``) and in 1, 2, … worker processes. Each figure is pairs/s over ``--batches`` batches after
a warm-up batch, ``--runs`` times; and the milliseconds the training process itself spends per batch when
the readers are ahead (the median of 40 batches with a pause between them): with workers, receiving a batch
(its tensors arrive as new shared-memory segments) is what a GPU step still pays. The goal in issue 16
(100,000 pairs/s) is for a 16-core GPU machine; on a small CPU machine the figures show the cost per core.

Writes ``benchmarks/results/data_path.{md,json}`` and prints one JSON line.

    .venv/bin/python benchmarks/bench_data_path.py [--pairs N] [--batches N] [--runs N] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, figure, mnist_egomotion_run, ref  # noqa: E402

GOAL_PAIRS_PER_S = 100_000  # issue 16, on 16 cores


def pairs_per_second(solver: Path, workers: int, batches: int) -> float:
    from converter import caffe_pb2
    from converter.io import read_solver
    from runner.data import NetFeeder
    from runner.solver_nets import train_net

    sp = read_solver(solver)
    proto, _ = train_net(sp, str(solver))
    with NetFeeder(proto, caffe_pb2.TRAIN, seed=1, workers=workers) as feeder:
        batch = next(iter(feeder.shapes.values()))[0]
        feeder.next()  # warm-up: workers started, first pages read
        start = time.perf_counter()
        for _ in range(batches):
            feeder.next()
        return batches * batch / (time.perf_counter() - start)


def main_process_ms(solver: Path, workers: int, batches: int) -> float:
    """Milliseconds the training process itself spends per batch when the readers are ahead of it (a pause
    between batches stands for the GPU step): what a step pays for its data when workers read."""
    from converter import caffe_pb2
    from converter.io import read_solver
    from runner.data import NetFeeder
    from runner.solver_nets import train_net

    sp = read_solver(solver)
    proto, _ = train_net(sp, str(solver))
    times = []
    with NetFeeder(proto, caffe_pb2.TRAIN, seed=1, workers=workers) as feeder:
        feeder.next()
        for _ in range(batches):
            time.sleep(0.01)
            start = time.perf_counter()
            feeder.next()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    from data_prep.mnist import load_mnist

    images = load_mnist(args.mnist).train_images
    cores = len(os.sched_getaffinity(0))
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        solver = mnist_egomotion_run(Path(tmp), images, args.pairs)
        for workers in [int(w) for w in args.workers.split(",")]:
            samples = [pairs_per_second(solver, workers, args.batches) for _ in range(args.runs)]
            figures.append(figure(f"MNIST pairs + labels through NetFeeder, {workers} worker(s), {cores} cores",
                                  samples, "pairs/s", ref("issue 16's goal on 16 cores", "goal", GOAL_PAIRS_PER_S),
                                  higher_is_better=True))
            figures.append(figure(f"time the training process spends per batch of 125, {workers} worker(s)",
                                  [main_process_ms(solver, workers, 40) for _ in range(args.runs)], "ms"))
    emit("data_path", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
