"""``egomotion plot LOG -o loss.png``: training loss, learning rate and test outputs over iterations.

Reads a Caffe-format log (ours or Caffe's own) with the regular expressions of Caffe's
``tools/extra/parse_log.py``: the last ``Iteration N`` seen keys every number that follows it. Drawn with
matplotlib (a project dependency, also used by the reports).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import CaffeError

ITERATION = re.compile(r"Iteration (\d+)")
LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = ([-+.\deEinfa]+)")
LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_NET = re.compile(r"Testing net \(#(\d+)\)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")


@dataclass
class ParsedLog:
    loss: list[tuple[int, float]] = field(default_factory=list)  # the smoothed loss of each display
    lr: list[tuple[int, float]] = field(default_factory=list)
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    test: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "name" or "name (#k)"


def parse_log(path: str | Path) -> ParsedLog:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise CaffeError(f"{path}: cannot read the log ({e.strerror})") from None
    out = ParsedLog()
    it, test_net = -1, 0
    test_nets: set[int] = set()
    for line in text.splitlines():
        m = ITERATION.search(line)
        if m:
            it = int(m.group(1))
        m = LOSS.search(line)
        if m:
            try:
                out.loss.append((int(m.group(1)), float(m.group(2))))
            except ValueError:
                pass
            continue
        m = TEST_NET.search(line)
        if m:
            test_net = int(m.group(1))
            test_nets.add(test_net)
            continue
        if "lr = " in line:
            m = LR.search(line)
            if m and it >= 0:
                out.lr.append((it, float(m.group(1))))
            continue
        m = TRAIN_OUTPUT.search(line)
        if m and it >= 0:
            out.train.setdefault(m.group(2), []).append((it, float(m.group(3))))
            continue
        m = TEST_OUTPUT.search(line)
        if m and it >= 0:
            out.test.setdefault(f"{m.group(2)} (#{test_net})", []).append((it, float(m.group(3))))
    if len(test_nets) <= 1:
        out.test = {k.rsplit(" (#", 1)[0]: v for k, v in out.test.items()}
    if not out.loss and not out.test:
        raise CaffeError(f"{path}: no training or test lines found (is it a Caffe/egomotion training log?)")
    return out


def save_figure(fig, output: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure written whole or not at all (``atomic_write_bytes``: a special file such as
    /dev/full is refused, a killed run leaves no half image), in the format its extension names."""
    import io

    from converter.io import atomic_write_bytes

    buf = io.BytesIO()
    fmt = Path(output).suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(buf, format=fmt, dpi=dpi)
    except ValueError as e:
        raise CaffeError(f"{output}: cannot draw to this file type ({e})") from None
    atomic_write_bytes(output, buf.getvalue())


def draw(parsed: ParsedLog, output: str | Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CaffeError("egomotion plot needs matplotlib (pip install matplotlib)") from None
    panels = [p for p in ("loss", "lr", "test") if (p == "loss" and parsed.loss) or (p == "lr" and parsed.lr)
              or (p == "test" and parsed.test)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "loss":
            xs, ys = zip(*parsed.loss, strict=True)
            ax.plot(xs, ys, lw=1, label="train loss (smoothed)")
            for name, points in parsed.test.items():
                if "loss" in name:
                    ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, label=f"test {name}")
            ax.set_ylabel("loss")
        elif panel == "lr":
            ax.plot(*zip(*parsed.lr, strict=True), lw=1, color="tab:green", drawstyle="steps-post",
                    label="learning rate")
            ax.set_ylabel("lr")
        else:
            for name, points in parsed.test.items():
                ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, label=name)
            ax.set_ylabel("test outputs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("iteration")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    try:
        save_figure(fig, output)
    finally:
        plt.close(fig)


def plot(args: argparse.Namespace) -> int:
    parsed = parse_log(args.log)
    draw(parsed, args.output, args.title or Path(args.log).name)
    print(f"wrote {args.output}: {len(parsed.loss)} loss points, {len(parsed.lr)} lr points, "
          f"{sum(len(v) for v in parsed.test.values())} test points")
    return 0
