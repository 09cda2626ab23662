"""results.md, results.csv and the plots of an experiment's evaluated runs, beside the thesis's numbers.

A row per measured run (its title), a column per label count, mean ± sd over seeds of the measure over the
whole test set; the thesis's numbers (``thesis`` in the run, aligned with the experiment's own label
counts, before any scale) in brackets; the measure of the last test batch alone (the thesis's MNIST
measure); the margins of the ``compare`` run over every other row; the pre-training behind them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from converter import experiment_pb2
from converter.io import read_text
from runner.curves import last_values, read_curves
from runner.experiments.engine import Job, Place
from runner.experiments.spec import EXPERIMENT_FILE, Experiment


def write_results(exp: Experiment, place: Place, records: list[dict]) -> str:
    """Write results.md/.csv, accuracy.png and pretraining_loss.png into the scale's run folder; return the text."""
    measured = [r for r in exp.param.run if r.HasField("measure")]
    base = {r.name: r for r in read_text(exp.folder / EXPERIMENT_FILE, experiment_pb2.ExperimentParameter()).run}
    counts = sorted({r["labels"] for r in records if "value" in r})
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if "value" in r:
            cells.setdefault((r["run"], r["labels"]), []).append(r)
    output = measured[0].measure.output if measured else "accuracy"
    with open(place.runs / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "labels", "seed", f"{output}_full_test", f"{output}_last_batch", "best_test",
                         "snapshot"])
        for r in records:
            if "value" in r:
                writer.writerow([r["run"], r["labels"], r["seed"], f"{r['value']:.4f}", f"{r['last_batch']:.4f}",
                                 f"{r['best_test']:.4f}" if "best_test" in r else "", r["snapshot"]])

    def thesis(run: str, count: int) -> float | None:
        ref = base.get(run)
        if ref is None or count not in ref.label_count or len(ref.thesis) != len(ref.label_count):
            return None
        return ref.thesis[list(ref.label_count).index(count)]

    def values(run: str, count: int, key: str) -> np.ndarray:
        return np.array([r[key] for r in cells.get((run, count), [])])

    def cell(run: str, count: int, key: str, with_thesis: bool) -> str:
        v = values(run, count, key)
        text = f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}" if len(v) else "–"
        ref = thesis(run, count)
        return text + (f" [{ref:.3g}]" if with_thesis and ref is not None else "")

    header = ["| run | " + " | ".join(str(c) for c in counts) + " |", "|---|" + "---|" * len(counts)]
    seeds = sorted({r["seed"] for r in records if "value" in r})
    lines = [f"# {exp.param.name or exp.name} (SCALE={exp.scale})", "",
             f"`{output}` on the **whole test set** after each run's last iteration, mean ± sd over seeds "
             f"{', '.join(map(str, seeds))}; the thesis's number in brackets.", "", *header]
    lines += [f"| {r.title or r.name} | " + " | ".join(cell(r.name, c, "value", True) for c in counts) + " |"
              for r in measured]
    lines += ["", f"The thesis's own measure: `{output}` of the **last test batch only**:", "", *header]
    lines += [f"| {r.title or r.name} | " + " | ".join(cell(r.name, c, "last_batch", False) for c in counts) + " |"
              for r in measured]
    if any("best_test" in r for r in records):
        lines += ["", f"The best test `{output}` seen during training (the thesis kept it):", "", *header]
        lines += [f"| {r.title or r.name} | " + " | ".join(cell(r.name, c, "best_test", False) for c in counts)
                  + " |" for r in measured if r.measure.best_test]
    probes = [p for r in records for p in r.get("probes", [])]
    if probes:
        from runner.experiments.probes import table

        lines += ["", "Per-layer probes: accuracy (%) on every test image of the split, mean over partitions:", "",
                  *table(probes)]
        with open(place.runs / "probes.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(probes[0]))
            writer.writeheader()
            writer.writerows(probes)
        _plot_probes(exp, place, probes)
    lines += _comparison(exp, measured, counts, values, thesis)
    lines += _pretraining(exp, place)
    if exp.overrides:
        lines += ["", f"SCALE={exp.scale} changes the experiment's files as follows (every run folder's "
                  "overrides.txt lists its own):", ""] + [f"- {line}" for line in exp.overrides]
    text = "\n".join(lines) + "\n"
    (place.runs / "results.md").write_text(text)
    _plot(exp, place, measured, counts, values, thesis)
    return text


def _comparison(exp, measured, counts, values, thesis) -> list[str]:
    """The ``compare`` run minus every other measured run (points, means over seeds), and every cell more than
    5 points from the thesis on the thesis's own measure."""
    if not exp.param.compare:
        return []
    first = exp.run(exp.param.compare)
    others = [r for r in measured if r.name != first.name]
    mean = {(r.name, c): values(r.name, c, "value").mean() if len(values(r.name, c, "value")) else float("nan")
            for r in measured for c in counts}
    lines = ["", f"{first.title} against the others (points, means over seeds, whole test set):", "",
             "| labels | " + " | ".join(f"{first.title} − {r.title or r.name}" for r in others) + " |",
             "|---|" + "---|" * len(others)]
    for c in counts:
        lines.append(f"| {c} | " + " | ".join(f"{100 * (mean[first.name, c] - mean[r.name, c]):+.1f}" for r in others)
                     + " |")
    far = [f"{r.title or r.name} at {c}: {values(r.name, c, 'last_batch').mean():.3f} vs {thesis(r.name, c):.2f}"
           for r in measured for c in counts if thesis(r.name, c) is not None and len(values(r.name, c, "last_batch"))
           and abs(values(r.name, c, "last_batch").mean() - thesis(r.name, c)) > 0.05]
    lines += ["", "Cells more than 5 points from the thesis on its own measure (last test batch): "
              + ("; ".join(far) if far else "none") + "."]
    return lines


def _pretraining(exp: Experiment, place: Place) -> list[str]:
    lines = ["", "Pre-training behind these numbers (from each run's train.csv):", ""]
    for run in exp.param.run:
        folder = place.folder(Job(run.name))
        if run.label_count or not (folder / "train.csv").exists():
            continue
        losses = last_values(read_curves(folder / "train.csv").get("train smoothed_loss", []))
        chosen = (folder / "CHOSEN").read_text().strip() if (folder / "CHOSEN").exists() else "?"
        rule = run.snapshot_rule if run.HasField("snapshot_rule") else exp.param.snapshot_rule
        result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else {}
        alive = (f"; {100 * result['alive']:.0f} % of its `{run.feature_blob}` features are non-zero on a test batch"
                 if "alive" in result else "")
        lines.append(f"- {run.title or run.name}: {len(losses)} displays, loss {losses[min(losses)]:.4g} → "
                     f"{losses[max(losses)]:.4g}, weights handed on: `{Path(chosen).name}` (snapshot rule "
                     f"{experiment_pb2.SnapshotRule.Rule.Name(rule.rule)}){alive}")
    return lines


def _plot_probes(exp: Experiment, place: Place, probes: list[dict]) -> None:
    """probes.png: accuracy per probed layer, a line per method and images per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in probes))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in probes):
        for n in sorted({r["per_class"] for r in probes}):
            means = [100 * np.mean([r["accuracy"] for r in probes if (r["method"], r["per_class"], r["layer"]) ==
                                    (method, n, layer)] or [np.nan]) for layer in layers]
            ax.plot(layers, means, marker="o", label=f"{method}, {n}/class")
    ax.set_xlabel("probed layer")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{exp.param.name or exp.name}: probes ({exp.scale})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(place.runs / "probes.png", dpi=120)
    plt.close(fig)


def _plot(exp, place, measured, counts, values, thesis) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in measured:
        means = [values(run.name, c, "value").mean() if len(values(run.name, c, "value")) else np.nan for c in counts]
        line, = ax.plot(counts, means, marker="o", label=f"{run.title or run.name} (ours)")
        refs = [(c, thesis(run.name, c)) for c in counts if thesis(run.name, c) is not None]
        if refs:
            ax.plot(*zip(*refs, strict=True), ls="--", color=line.get_color(), alpha=0.5, label="thesis")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel(measured[0].measure.output if measured else "accuracy")
    ax.set_title(f"{exp.param.name or exp.name}: {exp.scale}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(place.runs / "accuracy.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in exp.param.run:
        path = place.folder(Job(run.name)) / "train.csv"
        if run.label_count or not path.exists():
            continue
        by_iter: dict[int, float] = {}
        for name, curve in read_curves(path).items():
            if name.startswith("train loss"):
                for it, v in last_values(curve).items():
                    by_iter[it] = by_iter.get(it, 0.0) + v
        its = sorted(by_iter)
        ax.plot(its, [by_iter[i] for i in its], label=run.title or run.name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (sum of heads)")
    ax.set_yscale("log")
    ax.set_title("Pre-training losses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(place.runs / "pretraining_loss.png", dpi=120)
    plt.close(fig)
