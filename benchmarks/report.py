"""Collect ``benchmarks/results/*.json`` into ``BENCHMARKS.md`` at the repository root (``make bench``'s last step).

Every benchmark writes its figures through ``benchmarks/common.py``: a median of several runs with min and
max, and its references with the ratio median / reference. This renders one table per benchmark, in a
fixed order, under the machine and date; the notes on measured optimisations (``benchmarks/optimizations.md``,
before/after figures of each change that was kept or dropped) follow.

    .venv/bin/python benchmarks/report.py [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine  # noqa: E402

ORDER = ["gemm_peak", "converter", "mnist", "data_path", "shared", "profile", "kitti", "probe", "fuzz"]
TITLES = {"gemm_peak": "GEMM peak (the reference for the hardware's speed)",
          "converter": "Converted nets vs hand-written PyTorch (forward + backward)",
          "mnist": "MNIST experiment: pair generator and egomotion pre-training",
          "data_path": "The data path alone: MNIST pairs per second through NetFeeder",
          "shared": "Jobs that share the machine: two `egomotion time` side by side",
          "profile": "Profile of one MNIST egomotion iteration",
          "kitti": "KITTI pair generator (and training, with --train)",
          "probe": "Probe pipeline: ONNX Runtime vs the PyTorch module",
          "fuzz": "Fuzzing the readers (hypothesis)"}
KIND = {"measured": "same run", "caffe": "Caffe, caffe-times.md", "goal": "goal"}
SCRIPTS = {"converter": "bench_converter.py", "mnist": "bench_mnist.py", "kitti": "bench_kitti.py",
           "probe": "bench_probe.py", "profile": "profile_mnist.py", "shared": "bench_shared.py",
           "data_path": "bench_data_path.py"}
NOTES = Path(__file__).resolve().parent / "optimizations.md"


def number(x: float) -> str:
    if x == int(x) and abs(x) >= 1:
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def references(f: dict) -> str:
    refs = f.get("references", [])
    if not refs:
        return "–"
    return "; ".join(f"{r['ratio']:.3g}x {r['name']} ({number(r['value'])} {f['unit']}, "
                     f"{KIND.get(r['kind'], r['kind'])})" for r in refs)


def section(name: str, record: dict) -> list[str]:
    m = record.get("machine", {})
    lines = [f"## {TITLES.get(name, name)}", "",
             f"`benchmarks/{SCRIPTS.get(name, name + '.py')}`"
             f"{' ' + ' '.join(record['argv']) if record.get('argv') else ''}: {m.get('date', '?')}, load average "
             f"at the start {m.get('loadavg', '?')}, {m.get('threads', '?')} torch threads.", "",
             "| figure | median | min | max | runs | unit | ratio to references |", "|---|---|---|---|---|---|---|"]
    for f in record["figures"]:
        lines.append(f"| {f['name']} | {number(f['median'])} | {number(f['min'])} | {number(f['max'])} | {f['runs']} "
                     f"| {f['unit']} | {references(f)} |")
    notes = [f"- {f['name']}: {f['note']}" for f in record["figures"] if f.get("note")]
    if notes:
        lines += [""] + notes
    if name == "profile" and record.get("top_ops"):
        lines += ["", "Top operators by self CPU time (10 iterations):", "", "| operator | ms/iter | calls/iter |",
                  "|---|---|---|"]
        lines += [f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in record["top_ops"]]
    if name == "fuzz":
        for t in record.get("targets", []):
            for ex in t.get("failure_examples", []):
                lines.append(f"- failure in {t['target']}: {ex.get('error')} at {ex.get('where', '?')}")
    return lines + [""]


def report(results: Path = RESULTS) -> str:
    records = {}
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "figures" in record:
            records[path.stem] = record
    m = machine()
    gpu = m.get("gpu")
    names = [n for n in ORDER if n in records] + sorted(n for n in records if n not in ORDER)
    lines = ["# Benchmarks", "",
             f"Written by `benchmarks/report.py` (the last step of `make bench`) on {time.strftime('%Y-%m-%d %H:%M')}"
             f" from `benchmarks/results/*.json`.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
             f"torch {m.get('torch', '?')}.",
             f"GPU: {gpu}." if gpu else "GPU: none on this machine — every figure below is a CPU figure; on a machine "
             "with a GPU, `make bench` adds GPU GEMM figures and `bench_converter.py --device cuda` times the nets "
             "there.", "",
             "Each figure is the median of its runs (min and max beside it); the ratios divide that median by each "
             "reference: measured in the same run (the hand-written PyTorch module of the same net, the time the "
             "net's FLOPs take at the machine's GEMM peak), BVLC Caffe's figures for this machine "
             "(`shared/reference/caffe-times.md`), or a goal. Timings are wall clock on a machine that may be "
             "shared: the min is the least disturbed run, and the load average at each benchmark's start is given.",
             ""]
    if not names:
        lines += ["No results yet: run `make bench`.", ""]
    for name in names:
        lines += section(name, records[name])
    lines += corpus_section()
    if (results / "gpu.json").exists():
        lines += gpu_section(json.loads((results / "gpu.json").read_text()))
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    return "\n".join(lines)


def corpus_section(cases: Path = ROOT / "tests" / "bad_inputs" / "cases.tsv") -> list[str]:
    """The bad-input corpus by category (counted from the file ``tests/test_bad_inputs.py`` runs: each case
    must give exit 2 and one line naming the file and place, and leave nothing behind)."""
    if not cases.exists():
        return []
    names = [line.split("\t", 1)[0] for line in cases.read_text().splitlines() if line.strip() and line[0] != "#"]
    by_category: dict[str, int] = {}
    for name in names:
        category = name.split("_", 1)[0]
        by_category[category] = by_category.get(category, 0) + 1
    return ["## Bad inputs (`tests/test_bad_inputs.py`)", "",
            f"{len(names)} command lines in `tests/bad_inputs/cases.tsv`, each run by the suite: exit code 2, one "
            "stderr line naming the file and place (or the layer and blob), no traceback, and nothing left at the "
            "paths the command was asked to write. By category: "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])) + ". Kills, "
            "signals and full disks are in `tests/test_faults.py`.", ""]


def gpu_section(record: dict) -> list[str]:
    """``make gpu-check``'s figures (benchmarks/gpu_check.py, run on a lent GPU)."""
    v = record["versions"]
    modes = sorted({m for t in record["trajectories"].values() for m in t})
    lines = ["## GPU check (`make gpu-check`)", "",
             f"{v.get('gpu', v['device'])}, torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, Python "
             f"{v['python']}. Each golden trajectory trained by `egomotion train --gpu 0`; the largest relative "
             "loss error against BVLC Caffe's `losses.tsv` (CPU tolerance: 1e-4, adagrad 3e-3), with cuDNN on "
             "(torch's default), off (torch's own kernels) and, where measured, Caffe's own engine (`--engine "
             "caffe`: im2col + cuBLAS GEMM) and the cuDNN pass captured as CUDA graphs (`--cuda-graph`):", "",
             "| case | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]

    def cell(result: dict) -> str:
        if "error" in result:
            return f"failed: {result['error'][:80]}"
        return f"{result['max_rel_loss_error']:.1e} (iteration {result['at_iteration']})"

    for case, by_mode in record["trajectories"].items():
        lines.append(f"| {case} | " + " | ".join(cell(by_mode[m]) for m in modes) + " |")
    layers = record.get("layer_cases")
    if layers:
        layer_modes = sorted({m for t in layers.values() for m in t})
        lines += ["", "Every golden layer case replayed by `egomotion forward --backward` (Caffe's inputs, weights and "
                  "top diffs) in each mode: the largest relative error of the forward blobs / of the bottom and "
                  "parameter diffs against BVLC Caffe's (the CPU tests' tolerances: 1e-5 / 1e-4):", "",
                  "| case | " + " | ".join(layer_modes) + " |", "|---|" + "---|" * len(layer_modes)]
        for case, by_mode in layers.items():
            lines.append(f"| {case} | " + " | ".join(
                f"failed: {r['error'][:80]}" if "error" in r else f"{r['forward']:.1e} / {r['backward']:.1e}"
                for r in (by_mode[m] for m in layer_modes)) + " |")
    same = record.get("cuda_graph_equal_to_eager")
    if same:
        lines += ["", f"Captured losses equal to the eager cuDNN run's in {sum(same.values())} of {len(same)} cases"
                  + (f" (not: {', '.join(c for c, ok in same.items() if not ok)})" if not all(same.values()) else "")
                  + "."]
    if "mnist_step_ms" in record:
        graph = record.get("mnist_step_ms_cuda_graph")
        lines += ["", f"MNIST egomotion net (batch 125), the real training loop: {record['mnist_step_ms']:.1f} ms per "
                  f"iteration, so the thesis's 40,000 iterations take {record['mnist_40k_minutes']:.1f} min"
                  + (f"; with `--engine caffe` {record['mnist_step_ms_caffe_engine']:.1f} ms per iteration"
                     if "mnist_step_ms_caffe_engine" in record else "")
                  + (f"; with `--cuda-graph` {graph:.1f} ms" if isinstance(graph, float) else
                     f"; `--cuda-graph` failed: {graph}" if graph else "") + ".", ""]
    eager = record.get("eager_vs_handwritten")
    if eager:
        ours_launches = eager.get("launches", {}).get("ours", {})
        busy = f"; the GPU is busy {ours_launches['gpu_busy_share']:.0%} of our step (profiler)" \
            if "gpu_busy_share" in ours_launches else ""
        lines += [f"One step on one batch (forward, backward, SGD update): ours {eager['ours']:.2f} ms, the "
                  f"hand-written module with torch.optim.SGD {eager['handwritten']:.2f} ms: {eager['ratio']:.2f}x "
                  "(goal <= 1.05x)"
                  f"{busy}. GEMM peak measured in the same run: {record['gemm_peak_gflops']:,.0f} GFLOP/s.", ""]
        launches = eager.get("launches")
        if launches:
            ours, hand = launches["ours"], launches["handwritten"]
            lines += [f"{ours['unit'].capitalize()} per step: ours {ours['per_step']:.0f}, hand-written "
                      f"{hand['per_step']:.0f}. Most frequent, per step:", "",
                      "| ours | per step | hand-written | per step |", "|---|---|---|---|"]
            for pair in itertools.zip_longest(ours["most_frequent"].items(), hand["most_frequent"].items()):
                lines.append("| " + " | ".join(f"`{name[:60]}` | {count:g}" if name else " | "
                                               for name, count in (p or ("", 0) for p in pair)) + " |")
            lines.append("")
    data = record.get("data_path")
    if data:
        rates = ", ".join(f"{w} worker(s) {r:,.0f}" for w, r in data["pairs_per_s"].items())
        step = data["step"]
        lines += [f"Data path ({data['cpus']} CPUs): MNIST pairs/s through NetFeeder: {rates}. A training step "
                  f"with {step['workers']} worker(s) {step['wall_ms']:.2f} ms against {step['compute_ms']:.2f} ms on "
                  f"a batch read beforehand: {step['ratio']:.3f}x (goal <= 1.05x).", ""]
    ort = record.get("ort")
    if ort:
        if "used" in ort:
            lines += [f"ONNX Runtime ({ort['used']}) BCNN features at batch {ort['batch']}: "
                      f"{ort['ort_images_per_s']:,.0f} images/s against torch on CUDA "
                      f"{ort['torch_images_per_s']:,.0f}.", ""]
        else:
            lines += [f"ONNX Runtime on CUDA: not measured ({ort['skipped']}; providers: "
                      f"{', '.join(ort['providers'])}).", ""]
    nccl = record.get("nccl")
    if nccl and "skipped" not in nccl:
        lines += [(f"One-process NCCL {nccl['nccl']}: all-reduce of 4 MiB in {nccl['all_reduce_4MiB_ms']:.3f} ms, "
                   "result checked.") if nccl.get("ok") else f"One-process NCCL: failed ({nccl.get('error')}).", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    text = report()
    args.out.write_text(text)
    print(json.dumps({"benchmark": "report", "wrote": str(args.out), "sections": text.count("\n## ")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
