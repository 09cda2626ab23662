"""The one reader of ``train.csv`` (``iter,seconds,phase,name,value``, written by :class:`runner.logs.Csv`)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from converter.errors import CaffeError


def read_curves(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``train.csv`` rows (iter, seconds, phase, name, value) as {"phase name": [(iter, value), ...]}."""
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    curves[f"{row['phase']} {row['name']}"].append((float(row["iter"]), float(row["value"])))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError as e:
        raise CaffeError(f"{path}: cannot read ({e.strerror})") from None
    return dict(curves)


def last_values(curve: list[tuple[float, float]]) -> dict[int, float]:
    """``{iteration: value}`` of one curve; an iteration shown twice (a resumed run repeats the displays after
    its snapshot) keeps its later value."""
    return {int(it): value for it, value in curve}
