"""What every benchmark shares: the machine's description, figures with their spread and reference, and
the results file + one JSON line on stdout that ``benchmarks/report.py`` collects into BENCHMARKS.md.

A *figure* is one measured quantity repeated several times (``samples``): its median, min and max, and —
where there is one — a *reference* with the ratio figure / reference. References are of three kinds:
``measured`` (taken in the same run on the same machine: the hand-written PyTorch module, the machine's
GEMM peak), ``caffe`` (BVLC Caffe's figures for this machine, ``shared/reference/caffe-times.md``) and
``goal`` (a target the project set itself).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CAFFE_TIMES = ROOT.parent / "shared" / "reference" / "caffe-times.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, torch, GPU (or the statement that there is none), date, load: the run's context."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        else:
            info["gpu"] = None
    except ImportError:  # pragma: no cover - torch is a dependency
        info["gpu"] = None
    return info


def ref(name: str, kind: str, value: float | None) -> dict | None:
    """A reference for a figure: ``kind`` is measured (same run), caffe (caffe-times.md) or goal."""
    return None if value is None else {"name": name, "kind": kind, "value": float(value)}


def figure(name: str, samples: list[float], unit: str, *refs: dict | None, higher_is_better: bool = False,
           device: str = "cpu", note: str = "") -> dict:
    """One measured figure: median / min / max of its samples, and the ratio median / reference for each
    reference given (None references are left out)."""
    samples = [float(s) for s in samples]
    med = statistics.median(samples)
    out = {"name": name, "unit": unit, "runs": len(samples), "median": med, "min": min(samples),
           "max": max(samples), "samples": samples, "higher_is_better": higher_is_better, "device": device,
           "references": [{**r, "ratio": med / r["value"]} for r in refs if r and r["value"]]}
    if note:
        out["note"] = note
    return out


def net_forward_flops(net) -> int:
    """Multiply-adds x 2 of the Convolution and InnerProduct layers of a CaffeNet at its blob shapes:
    each top value of such a layer is a dot product over weight.shape[1:] (Cin/group·kh·kw, or K)."""
    import math

    flops = 0
    for i, lp in enumerate(net.layer_params):
        if lp.type in ("Convolution", "InnerProduct") and net.blob_uses[i]:
            weight = net.blob_uses[i][0].shape
            flops += 2 * math.prod(net.blob_shapes[lp.top[0]]) * math.prod(weight[1:])
    return flops


def count(name: str, value: float, unit: str = "", note: str = "") -> dict:
    """A figure that is a count, not a timing (one run)."""
    return figure(name, [value], unit, note=note)


def emit(bench: str, figures: list[dict], data: dict | None = None, markdown: str | None = None) -> dict:
    """Write ``results/<bench>.json`` (and ``.md``) and print the one JSON line of this benchmark."""
    record = {"benchmark": bench, "machine": machine(), "argv": sys.argv[1:], "figures": figures, **(data or {})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{bench}.json").write_text(json.dumps(record, indent=1) + "\n")
    if markdown is not None:
        (RESULTS / f"{bench}.md").write_text(markdown)
    line = {"benchmark": bench, "figures": {
        f["name"]: {"median": f["median"], "min": f["min"], "max": f["max"], "unit": f["unit"],
                    **{f"ratio to {r['name']}": r["ratio"] for r in f["references"]}} for f in figures}}
    print(json.dumps(line), flush=True)
    return record


def caffe_ms(net: str, threads: int, column: str = "total_ms") -> float | None:
    """Caffe's forward / backward / forward+backward ms for a timing net at a thread count."""
    import re

    if not CAFFE_TIMES.exists():
        return None
    for line in CAFFE_TIMES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[0].split(" ")[0] != net or not re.fullmatch(r"\d+", cells[2]):
            continue
        if int(cells[2]) == threads:
            values = dict(zip(("forward_ms", "backward_ms", "total_ms"),
                              (float(c.replace(",", "")) for c in cells[3:6]), strict=True))
            return values[column]
    return None


def caffe_step(net, solver, batch: dict, on_gpu: bool) -> None:
    """One training iteration as ``runner.train.Trainer`` runs it: diffs cleared, the forward with Caffe's
    loss, the backward, Caffe's update. On a GPU the labels are checked on the device, as in the trainer's
    GPU step, so the step never waits to read them back."""
    from converter.layers.loss import deferred_label_checks

    for p in net.params:
        if p.grad is not None:
            p.grad.zero_()
    with deferred_label_checks(on_gpu):
        net.loss(net(batch)).backward()
    solver.apply_update()
    solver.iter += 1


def mnist_egomotion_run(folder: Path, images, pairs: int) -> Path:
    """The MNIST experiment's egomotion run (its files as they are, SCALE=full), resolved by the experiment
    engine over ``pairs`` generated pairs (validation = training), with no test phase or snapshot; returns
    the run folder's solver.prototxt."""
    from data_prep.mnist import write_pair_lmdbs
    from runner.experiments import engine, spec

    exp = spec.load("mnist", "full")
    place = engine.Place(folder / "runs", folder / "data")
    place.data.mkdir(parents=True)
    write_pair_lmdbs(images, pairs, 0, place.data / "pairs_train_lmdb", place.data / "pairs_train_labels_lmdb")
    for kind in ("", "_labels"):
        (place.data / f"pairs_val{kind}_lmdb").symlink_to(place.data / f"pairs_train{kind}_lmdb")
    never = exp.run("egomotion").solver_override
    never.test_interval = never.snapshot = 10**9
    never.test_initialization = False
    return engine.resolve(exp, place, engine.Job("egomotion"))
