"""Jobs that share a machine: ``egomotion time`` of the thesis MNIST net alone, and two of them side by side.

Each run is the real CLI in its own process (``egomotion time --model <thesis_mnist_egomotion_b125>``): the
figure is its forward-backward milliseconds per iteration. Alone, the automatic thread choice takes every
usable CPU; two started together share them (``runner/threads.py``). The goal (issue 16): two side by side
take at most 2.6x one alone. For comparison, two side by side that each insist on every CPU
(``--threads <usable CPUs>``, what every job did before the share) show the collapse the share prevents.

Writes ``benchmarks/results/shared.{md,json}`` and prints one JSON line.

    .venv/bin/python benchmarks/bench_shared.py [--iterations N] [--runs N] [--no-fixed]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, figure, ref  # noqa: E402

from runner.threads import usable_cpus  # noqa: E402

NET = ROOT.parent / "shared" / "reference" / "timing" / "thesis_mnist_egomotion_b125.prototxt"
GOAL = 2.6
RESULT = re.compile(r"forward-backward ([0-9.]+) ms per iteration")


def side_by_side(jobs: int, iterations: int, extra: list[str]) -> list[float]:
    """Start ``jobs`` timings at once; each one's forward-backward ms per iteration."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "runner.cli", "time", "--model", str(NET), "--iterations", str(iterations),
               *extra]
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(jobs)]
    times = []
    for p in procs:
        out, err = p.communicate()
        found = RESULT.search(out)
        if p.returncode or not found:
            raise SystemExit(f"egomotion time failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
        times.append(float(found.group(1)))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-fixed", action="store_true", help="skip the side-by-side run with every CPU each")
    args = ap.parse_args()
    if not NET.exists():
        raise SystemExit(f"{NET} is not here (../shared/reference/timing)")
    cpus = usable_cpus()
    alone, shared, fixed = [], [], []
    for _ in range(args.runs):  # interleaved, so that drift of the machine hits each alike
        alone += side_by_side(1, args.iterations, [])
        shared += side_by_side(2, args.iterations, [])
        if not args.no_fixed:
            fixed += side_by_side(2, args.iterations, ["--threads", str(cpus)])
    one = statistics.median(alone)
    figures = [figure(f"thesis MNIST net, egomotion time alone ({cpus} usable CPUs)", alone, "ms/iter"),
               figure("two side by side, CPUs shared (the default)", shared, "ms/iter",
                      ref("one alone, same run", "measured", one), ref("goal: 2.6x one alone", "goal", GOAL * one))]
    if fixed:
        figures.append(figure(f"two side by side, --threads {cpus} each (no share)", fixed, "ms/iter",
                              ref("one alone, same run", "measured", one)))
    lines = [f"| run | ms per iteration (median of {len(alone)}) | vs one alone |", "|---|---|---|"]
    lines += [f"| {f['name']} | {f['median']:.1f} | {f['median'] / one:.2f}x |" for f in figures]
    text = "\n".join(lines) + "\n"
    print(text, file=sys.stderr)
    emit("shared", figures, {"usable_cpus": cpus, "iterations": args.iterations,
                             "ratio_shared": statistics.median(shared) / one,
                             "ratio_fixed": statistics.median(fixed) / one if fixed else None}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
