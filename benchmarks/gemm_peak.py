"""The machine's float32 GEMM peak as torch sees it: the reference for how much of the hardware a net uses.

``torch.matmul`` of two square float32 matrices (n = 2048 on the CPU, 8192 on a GPU), after a warm-up,
repeated ``--runs`` times; each run is ``--reps`` products and gives GFLOP/s = 2·n³·reps / seconds. On
the CPU with every thread and with one thread (the benchmarks' two settings); on each visible GPU with
TF32 off (the float32 the converter keeps) and on. Writes ``results/gemm_peak.{json,md}`` and prints one
JSON line; other benchmarks call :func:`peak_gflops` to measure the peak in their own run.

    .venv/bin/python benchmarks/gemm_peak.py [--runs 7] [--n 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, figure, machine  # noqa: E402


def gemm_runs(n: int, runs: int, device: str = "cpu", threads: int | None = None, reps: int | None = None,
              tf32: bool = False) -> list[float]:
    """GFLOP/s of ``runs`` timed batches of n×n float32 products."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        out = torch.empty(n, n, device=device)

        def sync():
            if device != "cpu":
                torch.cuda.synchronize()

        torch.matmul(a, b, out=out)  # warm-up: threads, kernels
        sync()
        if reps is None:  # about 0.2 s per run
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync()
            reps = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
        rates = []
        for _ in range(runs):
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=out)
            sync()
            rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
        return rates
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def peak_gflops(threads: int | None = None, runs: int = 5, n: int = 1024) -> float:
    """The median CPU GEMM rate at ``threads`` (a smaller n: a quick measurement inside another benchmark)."""
    return statistics.median(gemm_runs(n, runs, threads=threads))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()
    cores = torch.get_num_threads()
    figures = [figure(f"CPU float32 GEMM, {t} thread{'s' * (t > 1)} (n={args.n})",
                      gemm_runs(args.n, args.runs, threads=t), "GFLOP/s", higher_is_better=True)
               for t in sorted({cores, 1}, reverse=True)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            for tf32 in (False, True):
                figures.append(figure(f"GPU {i} ({name}) GEMM, {'TF32' if tf32 else 'float32'} (n=8192)",
                                      gemm_runs(8192, args.runs, f"cuda:{i}", tf32=tf32), "GFLOP/s",
                                      higher_is_better=True, device=f"cuda:{i}"))
    m = machine()
    lines = ["# GEMM peak", "", f"{m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
             f"GPU: {m['gpu'] or 'none on this machine'}", "", "| figure | median | min | max | runs |",
             "|---|---|---|---|---|"]
    lines += [f"| {f['name']} | {f['median']:,.1f} | {f['min']:,.1f} | {f['max']:,.1f} | {f['runs']} |"
              for f in figures]
    emit("gemm_peak", figures, {"n": args.n}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
