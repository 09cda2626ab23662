"""Where an iteration of the MNIST egomotion pre-training goes: data, forward, backward, solver update.

The thesis's net (``prototxt/mnist/egomotion_train_val.prototxt``, batch 125 pairs) is built by the real
trainer (``runner.train.Trainer``) on pair LMDBs written by ``data_prep.mnist``; then ``--iters``
iterations run with each phase timed separately (wall clock, same calls as ``Trainer.step``):

* data: ``NetFeeder.next()`` (LMDB read, Datum decode, transform, batch tensor);
* forward: the net and its loss; backward: ``loss.backward()``;
* update: ``Solver.apply_update`` (Caffe's SGD: decay, momentum, ``w -= v`` in ``torch._foreach_*`` ops).

The same is measured for the hand-written PyTorch module of this net (``handwritten.py``) on the same
batch with ``torch.optim.SGD(foreach=True)``: the reference measured in the same run. A ``torch.profiler``
table of the top operators (self CPU time) shows what dominates. Writes ``results/profile.{md,json}`` and
prints one JSON line.

    .venv/bin/python benchmarks/profile_mnist.py [--iters 60] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import handwritten  # noqa: E402
from common import caffe_ms, emit, figure, mnist_egomotion_run, ref  # noqa: E402

PHASES = ("data", "forward", "backward", "update")


def build_trainer(folder: Path, images):
    from converter.io import read_solver
    from runner.train import Trainer, TrainOptions

    solver = mnist_egomotion_run(folder, images, 5_000)
    sp = read_solver(solver)
    with contextlib.redirect_stderr(io.StringIO()):
        return Trainer(sp, str(solver), TrainOptions(progress=False, quiet=True))


def time_ours(trainer, iters: int, warmup: int = 5) -> dict[str, list[float]]:
    """Each phase of Trainer.step, timed apart (ms per iteration)."""
    net, solver, feeder = trainer.net, trainer.solver, trainer.train_feeder
    out = {p: [] for p in (*PHASES, "total")}
    for i in range(warmup + iters):
        for p in net.params:
            if p.grad is not None:
                p.grad.zero_()
        t0 = time.perf_counter()
        batch = feeder.next()
        t1 = time.perf_counter()
        loss = net.loss(net(batch))
        t2 = time.perf_counter()
        loss.backward()
        float(loss.item())
        t3 = time.perf_counter()
        solver.apply_update(solver.learning_rate())
        solver.iter += 1
        t4 = time.perf_counter()
        if i >= warmup:
            for p, (a, b) in zip((*PHASES, "total"), ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4)), strict=True):
                out[p].append((b - a) * 1e3)
    return out


def time_handwritten(iters: int, warmup: int = 5) -> dict[str, list[float]]:
    """The hand-written module (same weights) with torch.optim.SGD on a fixed random batch (no data phase)."""
    from bench_converter import make_inputs

    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet

    name = "thesis_mnist_egomotion_b125"
    net = CaffeNet(filter_net(read_net(ROOT.parent / "shared" / "reference" / "timing" / f"{name}.prototxt"),
                              net_state("TRAIN")))
    hand = handwritten.build(name).train()
    handwritten.copy_from_caffe(hand, net, name)
    inputs = make_inputs(net, torch.Generator().manual_seed(1), torch.device("cpu"))
    opt = torch.optim.SGD(hand.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    out = {p: [] for p in (*PHASES, "total")}
    for i in range(warmup + iters):
        opt.zero_grad(set_to_none=False)
        t1 = time.perf_counter()
        loss = hand(inputs)
        t2 = time.perf_counter()
        loss.backward()
        float(loss.item())
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for p, (a, b) in zip((*PHASES, "total"), ((t1, t1), (t1, t2), (t2, t3), (t3, t4), (t1, t4)), strict=True):
                out[p].append((b - a) * 1e3)
    return out


def profile_table(trainer, iters: int = 10, top: int = 15) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    net, solver, feeder = trainer.net, trainer.solver, trainer.train_feeder
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            for p in net.params:
                if p.grad is not None:
                    p.grad.zero_()
            loss = net.loss(net(feeder.next()))
            loss.backward()
            solver.apply_update(solver.learning_rate())
            solver.iter += 1
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / 1e3 / iters, e.count // iters) for e in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mnist-dir", default=os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared/data/mnist"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from data_prep.mnist import load_mnist

    images = load_mnist(args.mnist_dir).train_images
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(Path(d), images)
        try:
            ours = time_ours(trainer, args.iters)
            hand = time_handwritten(args.iters)
            table = profile_table(trainer)
        finally:
            trainer.close()
    caffe = caffe_ms("thesis_mnist_egomotion_b125", args.threads)
    figures = []
    for p in (*PHASES, "total"):
        hand_ref = ref("hand-written module + torch.optim.SGD", "measured",
                       statistics.median(hand[p]) if p != "data" else None)
        figures.append(figure(f"egomotion b125 {p}", ours[p], "ms/iter", hand_ref))
    fb = [f + b for f, b in zip(ours["forward"], ours["backward"], strict=True)]
    figures.append(figure("egomotion b125 forward+backward", fb, "ms/iter",
                          ref(f"BVLC Caffe, {args.threads} threads", "caffe", caffe)))
    med = {p: statistics.median(v) for p, v in ours.items()}
    lines = ["# Profile of one MNIST egomotion iteration (batch 125 pairs)", "",
             f"{args.iters} iterations, {args.threads} threads; ms per iteration, median (min-max).", "",
             "| phase | ours | share | hand-written + torch.optim.SGD |", "|---|---|---|---|"]
    for p in (*PHASES, "total"):
        h = "–" if p == "data" else f"{statistics.median(hand[p]):.2f}"
        lines.append(f"| {p} | {med[p]:.2f} ({min(ours[p]):.2f}-{max(ours[p]):.2f}) | "
                     f"{100 * med[p] / med['total']:.0f} % | {h} |")
    lines += ["", f"BVLC Caffe forward+backward, same net and threads: {caffe} ms.", "",
              "Top operators by self CPU time (10 iterations):", "", "| operator | ms/iter | calls/iter |",
              "|---|---|---|"]
    lines += [f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in table]
    emit("profile", figures, {"phases_ms": med, "top_ops": table}, "\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
