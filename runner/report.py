"""Probe tables as the thesis prints them: rows = pre-training method, columns = images per class × layer.

Every cell is the mean ± sd (sample sd, over partitions) of the top-1 test accuracy in percent. The
thesis's own numbers (report/draft.org @ 8092dfc, thesis-and-paper.md §1.4.5) are written beside ours —
in the markdown as a second table with the same columns, in the CSV as rows with ``source = thesis``,
in the PNG as dashed lines. Remember when comparing that every thesis SUN figure is the accuracy of
the *last test batch of 125 images* (a multiple of 1/375 over 3 splits), not of the whole test set.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from converter.io import atomic_write_bytes

THESIS_SUN = {
    "ALEX-1000": {5: [3.73, 5.07, 5.07, 8.53, 10.40], 20: [9.07, 12.53, 16.27, 17.60, 10.67]},
    "ALEX-20": {5: [2.93, 1.87, 3.73, 5.07, 3.20], 20: [6.13, 5.33, 5.33, 4.53, 5.07]},
    "KITTI-SFA": {5: [2.13, 3.20, 2.40, 1.60, 1.87], 20: [4.53, 3.73, 2.13, 2.40, 2.93]},
    "KITTI-EGO": {5: [2.93, 1.87, 3.20, 5.87, 1.33], 20: [6.67, 7.47, 9.87, 9.33, 4.00]},
}
"""SUN-397 accuracy (%) per layer L1..L5, mean of 3 splits (thesis §1.4.5)."""

THESIS_IMAGENET = {
    "KITTI-EGO": {1: 0.49, 5: 1.27, 10: 2.14, 20: 4.13, 1000: 20.8},
    "KITTI-SFA": {1: 0.35, 5: 0.75, 10: 1.34, 20: 2.64, 1000: 11.83},
    "ALEXNET (random init)": {1: 0.45, 5: 0.95, 10: 1.91, 20: 3.69, 1000: 18.35},
}
"""ILSVRC'12 top-1 (%) after fine-tuning all layers, by images per class (thesis §1.4.5)."""

THESIS_LAYERS = ["L1", "L2", "L3", "L4", "L5"]


def summarize(results) -> tuple[list[str], list[str], list[int], dict]:
    """(methods, layers, per-class sizes, {(method, layer, n): (mean %, sd %, values %, class-mean %)})."""
    methods = list(dict.fromkeys(r.method for r in results))
    layers = list(dict.fromkeys(r.layer for r in results))
    sizes = sorted({r.per_class for r in results})
    groups = defaultdict(list)
    for r in results:
        groups[(r.method, r.layer, r.per_class)].append(r)
    cells = {}
    for key, rs in groups.items():
        values = [100 * r.accuracy for r in rs]
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        cells[key] = (float(np.mean(values)), sd, values, float(np.mean([100 * r.class_mean_accuracy for r in rs])))
    return methods, layers, sizes, cells


def markdown(results, probe: str, thesis: str = "sun") -> str:
    methods, layers, sizes, cells = summarize(results)
    parts = rs_counts(results)
    head = ["method"] + [f"{n}/class {layer}" for n in sizes for layer in layers]
    lines = [f"### Probe accuracy (%), probe `{probe}`, mean ± sd over {parts} partition(s)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m]
        for n in sizes:
            for layer in layers:
                cell = cells.get((m, layer, n))
                row.append("–" if cell is None else f"{cell[0]:.2f} ± {cell[1]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    blobs = list(dict.fromkeys((r.layer, r.blob) for r in results))
    lines += ["", "Layers: " + ", ".join(f"{label} = `{blob}`" for label, blob in blobs) + "."]
    if thesis == "sun":
        shown = [n for n in sizes if n in (5, 20)] or [5, 20]
        head = ["method (thesis)"] + [f"{n}/class {layer}" for n in shown for layer in THESIS_LAYERS]
        lines += ["", "### The thesis's SUN-397 numbers (%), mean of 3 splits (last test batch of 125 images)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, by_n in THESIS_SUN.items():
            lines.append("| " + " | ".join([m] + [f"{v:.2f}" for n in shown for v in by_n[n]]) + " |")
    elif thesis == "imagenet":
        shown = sorted(THESIS_IMAGENET["KITTI-EGO"])
        lines += ["", "### The thesis's ILSVRC'12 top-1 (%) after fine-tuning all layers", "",
                  "| method (thesis) | " + " | ".join(f"{n}/class" for n in shown) + " |",
                  "|" + "---|" * (len(shown) + 1)]
        for m, by_n in THESIS_IMAGENET.items():
            lines.append(f"| {m} | " + " | ".join(f"{by_n[n]:.2f}" for n in shown) + " |")
    return "\n".join(lines) + "\n"


def rs_counts(results) -> int:
    return len({r.partition for r in results})


def csv_text(results, thesis: str = "sun") -> str:
    methods, layers, sizes, cells = summarize(results)
    blob = {r.layer: r.blob for r in results}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "method", "layer", "blob", "per_class", "partitions", "mean_accuracy", "sd_accuracy",
                "mean_class_accuracy", "values"])
    for m in methods:
        for n in sizes:
            for layer in layers:
                cell = cells.get((m, layer, n))
                if cell is not None:
                    w.writerow(["ours", m, layer, blob[layer], n, len(cell[2]), f"{cell[0]:.4f}", f"{cell[1]:.4f}",
                                f"{cell[3]:.4f}", " ".join(f"{v:.4f}" for v in cell[2])])
    if thesis == "sun":
        for m, by_n in THESIS_SUN.items():
            for n, values in by_n.items():
                for layer, v in zip(THESIS_LAYERS, values, strict=True):
                    w.writerow(["thesis", m, layer, "", n, 3, f"{v:.2f}", "", "", ""])
    elif thesis == "imagenet":
        for m, by_n in THESIS_IMAGENET.items():
            for n, v in by_n.items():
                w.writerow(["thesis", m, "all (fine-tuned)", "", n, "", f"{v:.2f}", "", "", ""])
    return buf.getvalue()


def png_bytes(results, probe: str, thesis: str = "sun") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, layers, sizes, cells = summarize(results)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, n in zip(axes[0], sizes, strict=True):
        x = np.arange(len(layers))
        for i, m in enumerate(methods):
            mean = [cells.get((m, layer, n), (math.nan,))[0] for layer in layers]
            sd = [cells.get((m, layer, n), (0, 0))[1] for layer in layers]
            ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, color=colours[i % len(colours)], label=m)
        if thesis == "sun" and n in (5, 20) and layers == THESIS_LAYERS:
            for j, (m, by_n) in enumerate(THESIS_SUN.items()):
                ax.plot(x, by_n[n], linestyle="--", marker=".", alpha=0.6,
                        color=colours[(len(methods) + j) % len(colours)], label=f"thesis {m}")
        ax.set_xticks(x, layers)
        ax.set_title(f"{n} images per class")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test accuracy (%), probe '{probe}'")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(results, out: Path, probe: str, thesis: str = "sun", stem: str = "probe") -> dict[str, Path]:
    """``probe.md``, ``probe.csv`` and ``probe.png`` in ``out`` (each written atomically)."""
    files = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    atomic_write_bytes(files["markdown"], markdown(results, probe, thesis).encode())
    atomic_write_bytes(files["csv"], csv_text(results, thesis).encode())
    atomic_write_bytes(files["png"], png_bytes(results, probe, thesis))
    return files
