"""Pairs per second of the KITTI pair generator (``egomotion data kitti-pairs``), on one core.

On the real sample (``../shared/data/kitti_odometry_00``: sequence 00, 151 frames of image_0) this
writes the thesis's records — one random 227×227 window per pair, image LMDB + label LMDB + manifest —
for grey (2-channel) and colour (6-channel, the grey frames read as BGR) pairs, and reports:

* ``pairs/s``: the whole job as the command runs it (sampling, labels, manifest, decoding every frame
  once, cropping, Datum encoding, both LMDBs with their commits);
* ``pairs/s, frames cached``: the same after the frames are decoded — the rate once a sequence's
  frames are in memory, which is the generator's own cost;
* the one-off decode time of the frames (1241×376 PNG);
* pairs per CPU-second of the whole job (user + system time): what one core can do when the disk keeps
  up. Both LMDBs are written through ``LMDBWriter``, which syncs every commit to disk, so colour pairs
  (309 KB each) are bound by the disk's write rate when it is below ~150 MB/s.

OpenCV runs on one thread. The goal is ≥ 500 pairs/s with 227×227 crops.

Then the data path of training: the thesis's egomotion train net (``prototxt/kitti``, batch 60 colour pairs
and their labels, minus the mean) read through ``runner.data.NetFeeder`` from 200 generated pairs, with the
reading in this process and in 1 and 2 worker processes (:mod:`runner.prefetch`): pairs/s. Issue 16's goal
(5,000 pairs/s) is for 16 cores; here the figures show what each core adds.

With ``--train`` it also times training of the thesis's egomotion net (``prototxt/kitti``, AlexNet
siamese, 6-channel 227×227 pairs) through the real loop — LMDB reading, mean subtraction, forward,
backward, Caffe's SGD update — at batch 8 (and 16) with 1 and 2 torch threads: the seconds per iteration
are the difference of two runs (N+3 and 3 iterations), so building the net is not counted. Caffe's own
figures (``caffe-times.md``, ``caffe time``: forward + backward, no data, no update) are shown beside.

Each generator figure is the median of ``--runs`` runs (min and max beside it). Writes
``benchmarks/results/kitti.{md,json}`` (the table also to stderr) and prints one JSON line.

    .venv/bin/python benchmarks/bench_kitti.py [--pairs N] [--quick] [--train [--iters N]]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import kitti  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, figure, ref  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "kitti_odometry_00"
RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 500.0


def bench(pairs: int, mode: str, tmp: Path) -> dict:
    root = kitti.find_root(SAMPLE)
    opts = kitti.PairOptions(cameras=("image_0",), mode=mode, total_pairs={"train": pairs}, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    report = kitti.make_pairs(root, tmp / f"{mode}_job", opts, train="00", val="none", echo=lambda _: None)
    job, cpu = time.perf_counter() - t0, time.process_time() - c0
    # The generator alone: frames already decoded (a cache that holds every frame of the sequence).
    seq = kitti.open_sequence(root, kitti.Range("00"), opts.cameras, need_poses=True)
    plan = kitti.plan_pairs([seq], opts, np.random.default_rng(1))
    cache = kitti.FrameCache({"00": seq}, mode)
    t0 = time.perf_counter()
    for f in range(seq.count):
        cache.get("00", "image_0", f)
    decode = time.perf_counter() - t0
    cache.release_before = lambda *a: None  # keep every frame: the generator's own cost
    timing = kitti.write_lmdbs(plan, {"00": seq}, tmp / f"{mode}_cached" / "images", tmp / f"{mode}_cached" / "labels",
                               mode, cache=cache)
    size = sum(f.stat().st_size for f in (tmp / f"{mode}_job" / "pairs_train_lmdb").iterdir())
    return {"mode": mode, "channels": report["channels"], "pairs": pairs, "job_s": job, "job_pairs_per_s": pairs / job,
            "job_pairs_per_cpu_s": pairs / cpu,
            "cached_pairs_per_s": timing["pairs_per_s"], "decode_frames": seq.count, "decode_s": decode,
            "lmdb_mb": size / 2**20}


CAFFE_MS = {(16, 1): 1294.0, (16, 2): 803.0}  # thesis_kitti_egomotion_b16, caffe-times.md
CAFFE_NOTE = "Caffe: forward+backward of thesis_kitti_egomotion_b16 (caffe-times.md); no batch-8 figure for this net"


def train_net_text(data: Path, batch: int) -> str:
    """The thesis's KITTI egomotion train/val net reading the pairs in ``data`` at ``batch``."""
    net = (ROOT / "prototxt" / "kitti" / "egomotion_train_val.prototxt").read_text()
    return net.replace("data/kitti/egomotion/", f"{data}/").replace("batch_size: 60", f"batch_size: {batch}")


def feeder_pairs_per_s(data: Path, workers: int, batches: int, batch: int = 60) -> float:
    """Pairs/s the training net's Data layers deliver through NetFeeder with ``workers`` processes."""
    from converter import caffe_pb2
    from converter.io import filter_net, net_state, parse_net
    from runner.data import NetFeeder

    proto = filter_net(parse_net(train_net_text(data, batch)), net_state("TRAIN"))
    with NetFeeder(proto, caffe_pb2.TRAIN, seed=1, workers=workers) as feeder:
        feeder.next()  # warm-up: workers started, first pages read
        start = time.perf_counter()
        for _ in range(batches):
            feeder.next()
        return batches * batch / (time.perf_counter() - start)


def bench_train(data: Path, tmp: Path, batch: int, threads: int, iters: int) -> dict:
    import torch

    from converter.io import read_solver
    from runner.train import TrainOptions, run

    net = train_net_text(data, batch)
    folder = tmp / f"train_b{batch}_t{threads}"
    folder.mkdir()
    (folder / "net.prototxt").write_text(net)
    torch.set_num_threads(threads)
    seconds = []
    for n in (3, 3 + iters):
        (folder / "solver.prototxt").write_text(
            f'net: "{folder}/net.prototxt"\nbase_lr: 0.001\nlr_policy: "fixed"\nmomentum: 0.9\n'
            f'weight_decay: 0.0005\nmax_iter: {n}\ndisplay: 0\ntest_iter: 1\ntest_interval: 100000\n'
            f'test_initialization: false\nsnapshot_after_train: false\nsnapshot_prefix: "{folder}/s"\n'
            f'random_seed: 1\n')
        t0 = time.perf_counter()
        run(read_solver(folder / "solver.prototxt"), str(folder / "solver.prototxt"),
            TrainOptions(progress=False, quiet=True, log=str(folder / f"log{n}"), csv=str(folder / f"csv{n}")))
        seconds.append(time.perf_counter() - t0)
    per_iter = (seconds[1] - seconds[0]) / iters
    return {"batch": batch, "threads": threads, "s_per_iter": per_iter, "iter_per_s": 1 / per_iter,
            "pairs_per_s": batch / per_iter, "caffe_ms": CAFFE_MS.get((batch, threads))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1,000 pairs")
    parser.add_argument("--train", action="store_true", help="also time training the egomotion net")
    parser.add_argument("--iters", type=int, default=10, help="measured training iterations per setting")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each generator measurement")
    args = parser.parse_args()
    if not SAMPLE.exists():
        print(f"{SAMPLE} is absent", file=sys.stderr)
        return 1
    cv2.setNumThreads(1)
    pairs = 1000 if args.quick else args.pairs
    training = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: [] for mode in ("gray", "color")}
        for mode, rs in runs.items():
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(dir=tmp) as run_tmp:  # a colour run writes 3 GB: one at a time
                    rs.append(bench(pairs, mode, Path(run_tmp)))
        rows = [sorted(rs, key=lambda r: r["job_pairs_per_s"])[len(rs) // 2] for rs in runs.values()]  # median run
        data = Path(tmp) / "train_data"
        opts = kitti.PairOptions(cameras=("image_0",), mode="color", total_pairs={"train": 200, "val": 16})
        kitti.make_pairs(SAMPLE, data, opts, train="00:0-119", val="00:120-150", mean=True, echo=lambda _: None)
        feeding = {w: [feeder_pairs_per_s(data, w, 4 if args.quick else 12) for _ in range(args.runs)]
                   for w in (0, 1, 2)}
        if args.train:
            for batch, threads in ((8, 1), (8, 2), (16, 1), (16, 2)):
                training.append(bench_train(data, Path(tmp), batch, threads, args.iters))
    lines = [f"KITTI pair generator, {pairs} pairs of 227x227 windows from the 151-frame sample, one core "
             f"({platform.processor() or platform.machine()}, goal >= {GOAL:.0f} pairs/s)", "",
             "| pairs | channels | whole job pairs/s | per CPU-second | frames cached pairs/s | decode 151 frames "
             "| LMDB MB | goal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "met" if r["job_pairs_per_s"] >= GOAL else "missed"
        lines.append(f"| {r['mode']} | {r['channels']} | {r['job_pairs_per_s']:.0f} | {r['job_pairs_per_cpu_s']:.0f} | "
                     f"{r['cached_pairs_per_s']:.0f} | "
                     f"{r['decode_s']:.2f} s | {r['lmdb_mb']:.0f} | {ok} |")
    lines += ["", "The training net's data path (batch 60 colour pairs + labels, mean subtracted) through NetFeeder:",
              "", "| workers | pairs/s (median) |", "|---|---|"]
    lines += [f"| {w} | {statistics.median(v):,.0f} |" for w, v in feeding.items()]
    if training:
        lines += ["", f"Training the egomotion net (AlexNet siamese, 6x227x227 pairs), {args.iters} iterations "
                  "through the real loop (LMDB, mean, forward, backward, SGD update)", "",
                  "| batch | threads | s/iter | iter/s | pairs/s | Caffe ms/iter (pairs/s) |",
                  "|---|---|---|---|---|---|"]
        for r in training:
            caffe = f"{r['caffe_ms']:.0f} ({r['batch'] / r['caffe_ms'] * 1000:.1f})" if r["caffe_ms"] else "-"
            lines.append(f"| {r['batch']} | {r['threads']} | {r['s_per_iter']:.3f} | {r['iter_per_s']:.2f} | "
                         f"{r['pairs_per_s']:.1f} | {caffe} |")
        lines += ["", CAFFE_NOTE]
    text = "\n".join(lines)
    print(text, file=sys.stderr)
    figures = [figure(f"KITTI pair generator, {mode} ({rs[0]['channels']} channels, whole job, one core)",
                      [r["job_pairs_per_s"] for r in rs], "pairs/s", ref("goal", "goal", GOAL), higher_is_better=True)
               for mode, rs in runs.items()]
    figures += [figure(f"KITTI training net's data path through NetFeeder, {w} worker(s), {os.cpu_count()} cores", v,
                       "pairs/s", ref("issue 16's goal on 16 cores", "goal", 5000), higher_is_better=True)
                for w, v in feeding.items()]
    figures += [figure(f"KITTI egomotion training, batch {r['batch']}, {r['threads']} thread(s)",
                       [r["s_per_iter"] * 1e3], "ms/iter",
                       ref(f"BVLC Caffe forward+backward, {r['threads']} thread(s)", "caffe", r["caffe_ms"]))
                for r in training]
    emit("kitti", figures, {"generator": rows, "generator_runs": runs, "training": training, "data_path": feeding},
         text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
