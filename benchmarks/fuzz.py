"""Fuzzing at scale: at least 10,000 hypothesis cases per reader (targets in ``tests/fuzzing.py``).

Each target runs in its own process (so that its peak memory is its own) with hypothesis' generate phase
only and no shrinking: every case runs to the end whatever the previous one did, and is counted as
accepted (the reader returned), refused (CaffeError, the expected answer to a bad file) or failed (any
other exception, or slower than ``--deadline``: a hang). Failures are listed with their input (hex,
truncated) so that they can be replayed. Peak RSS shows that no case allocated memory its input did not
justify. Writes ``benchmarks/results/fuzz.{md,json}`` and prints one JSON line.

    .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--targets prototxt,caffemodel,datum,idx,lmdb] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count, emit  # noqa: E402


def fuzz_one(name: str, cases: int, seed: int, deadline: float) -> dict:
    """Run one target in this process; the result as a dict."""
    import warnings

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests import fuzzing

    warnings.simplefilter("ignore")
    fuzzing.warm_up()
    target = fuzzing.TARGETS[name]()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = {"accepted": 0, "refused": 0}
    failures: list[dict] = []
    slowest = [0.0]

    @hypothesis_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def run(case):
        start = time.perf_counter()
        try:
            outcome = target.run(case)
        except Exception as e:  # noqa: BLE001 - counting every non-CaffeError escape is the point
            outcome = "failed"
            if len(failures) < 20:
                frame = traceback.extract_tb(e.__traceback__)[-1]
                failures.append({"error": f"{type(e).__name__}: {str(e)[:300]}",
                                 "where": f"{Path(frame.filename).name}:{frame.lineno}", "input": repr(case)[:2000]})
            else:
                failures.append({})
        took = time.perf_counter() - start
        slowest[0] = max(slowest[0], took)
        if took > deadline and outcome != "failed":
            outcome = "failed"
            failures.append({"error": f"slower than the {deadline} s deadline ({took:.2f} s)",
                             "input": repr(case)[:2000]})
        counts[outcome] = counts.get(outcome, 0) + 1

    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    total = counts["accepted"] + counts["refused"] + counts.get("failed", 0)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"target": name, "what": target.what, "cases": total, "accepted": counts["accepted"],
            "refused": counts["refused"], "failures": counts.get("failed", 0), "time_s": round(wall, 2),
            "ms_per_case": round(1e3 * wall / max(total, 1), 3), "slowest_case_s": round(slowest[0], 3),
            "peak_rss_mb": round(rss_after / 1024, 1), "rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
            "seed": seed, "failure_examples": [f for f in failures if f][:10]}


def table(rows: list[dict], meta: dict) -> str:
    lines = ["# Fuzzing the readers", "",
             f"{meta['date']}, {meta['machine']}; hypothesis {meta['hypothesis']}, generate phase only, seed "
             f"{meta['seed']}, deadline {meta['deadline_s']} s per case. Targets: `tests/fuzzing.py`.", "",
             "| target | what | cases | accepted | refused (CaffeError) | failures | time | per case | slowest | "
             "peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['what']} | {r['cases']:,} | {r['accepted']:,} | {r['refused']:,} | "
                     f"{r['failures']} | {r['time_s']:.1f} s | {r['ms_per_case']:.2f} ms | "
                     f"{r['slowest_case_s']:.2f} s | {r['peak_rss_mb']:.0f} MB |")
    for r in rows:
        for f in r["failure_examples"]:
            lines.append(f"\n- {r['target']}: {f['error']} at {f.get('where', '?')} — input `{f['input'][:200]}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--targets", default="prototxt,caffemodel,datum,idx,lmdb")
    parser.add_argument("--seed", type=int, default=int(time.strftime("%Y%m%d")))
    parser.add_argument("--deadline", type=float, default=2.0, help="seconds; a slower case counts as a hang")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this target here, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(fuzz_one(args.one, args.cases, args.seed, args.deadline)))
        return 0

    import hypothesis

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in args.targets.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--cases", str(args.cases), "--seed",
                               str(args.seed), "--deadline", str(args.deadline)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        if proc.returncode != 0:
            row = {"target": name, "what": "", "cases": 0, "accepted": 0, "refused": 0, "failures": 1, "time_s": 0,
                   "ms_per_case": 0, "slowest_case_s": 0, "peak_rss_mb": 0, "rss_growth_mb": 0, "seed": args.seed,
                   "failure_examples": [{"error": f"the fuzzing process died ({proc.returncode}): "
                                                  f"{proc.stderr.strip().splitlines()[-1:] or ''}", "input": ""}]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"fuzz {name}: {row['cases']} cases, {row['failures']} failures, {row['time_s']} s", file=sys.stderr,
              flush=True)
        rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "hypothesis": hypothesis.__version__, "seed": args.seed, "deadline_s": args.deadline,
            "cases_per_target": args.cases}
    figures = []
    for r in rows:
        note = (f"{r['failures']} failures; {r['accepted']:,} accepted, {r['refused']:,} refused with CaffeError; "
                f"{r['time_s']:.1f} s; slowest case {r['slowest_case_s']:.2f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
        figures.append(count(f"fuzz {r['target']}: cases", r["cases"], "cases", note))
        figures.append(count(f"fuzz {r['target']}: failures", r["failures"], "cases"))
        figures.append(count(f"fuzz {r['target']}: time per case", r["ms_per_case"], "ms"))
    emit("fuzz", figures, {"meta": meta, "targets": rows}, table(rows, meta))
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
