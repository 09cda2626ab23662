"""Reading an experiment folder: ``prototxt/<experiment>/experiment.prototxt`` and a named scale over it.

A scale is a set of overrides written in the experiment file (``scale { name: "demo" … }``): each of its
``data`` and ``run`` entries names a stage or run of the experiment, and every field it sets replaces that
entry's field (sub-messages are merged field by field, repeated fields replaced whole). :func:`load` returns
the experiment with the scale applied and one line per override, which the engine prints and writes into
every run folder, so nothing changes a value silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import message as pb_message

from converter import experiment_pb2
from converter.errors import CaffeError
from converter.io import read_text

PROTOTXT = Path(__file__).resolve().parents[2] / "prototxt"
EXPERIMENT_FILE = "experiment.prototxt"


@dataclass
class Experiment:
    """One experiment folder with a scale applied."""

    name: str              # the folder's name: runs/<name>/<scale>/, data/<name>/<scale>/
    folder: Path
    scale: str
    param: experiment_pb2.ExperimentParameter
    overrides: list[str]   # "run sfa10: solver_override.max_iter = 3000", … (what the scale changed)

    def run(self, name: str) -> experiment_pb2.RunParameter:
        for run in self.param.run:
            if run.name == name:
                return run
        raise CaffeError(f"{self.folder / EXPERIMENT_FILE}: no run named '{name}' "
                         f"(runs: {', '.join(r.name for r in self.param.run)})")

    def data_stage(self, name: str) -> experiment_pb2.DataStage:
        for stage in self.param.data:
            if stage.name == name:
                return stage
        raise CaffeError(f"{self.folder / EXPERIMENT_FILE}: no data stage named '{name}'")

    def path(self, relative: str) -> Path:
        """A file named by the experiment (a solver, a deploy net), relative to its folder."""
        return self.folder / relative


def find_folder(experiment: str) -> Path:
    """``mnist`` → ``prototxt/mnist``; a path to a folder (or to its experiment.prototxt) is taken as is."""
    given = Path(experiment)
    for candidate in (given, PROTOTXT / experiment):
        if (candidate / EXPERIMENT_FILE).is_file():
            return candidate
        if candidate.name == EXPERIMENT_FILE and candidate.is_file():
            return candidate.parent
    known = sorted(p.parent.name for p in PROTOTXT.glob(f"*/{EXPERIMENT_FILE}"))
    raise CaffeError(f"no experiment '{experiment}': neither {given / EXPERIMENT_FILE} nor "
                     f"{PROTOTXT / experiment / EXPERIMENT_FILE} exists (experiments: {', '.join(known)})")


def load(experiment: str, scale: str | None = None) -> Experiment:
    folder = find_folder(experiment)
    path = folder / EXPERIMENT_FILE
    param = read_text(path, experiment_pb2.ExperimentParameter())
    check(param, path)
    scale = scale or param.default_scale
    scales = {s.name: s for s in param.scale}
    if scale not in scales:
        raise CaffeError(f"{path}: no scale '{scale}' (scales: {', '.join(scales) or 'none'})")
    overrides: list[str] = []
    for entry in scales[scale].data:
        target = _named(param.data, entry.name, path, "data stage")
        overrides += [f"data {entry.name}: {line}" for line in merge(target, entry, skip=("name",))]
    for entry in scales[scale].run:
        target = _named(param.run, entry.name, path, "run")
        overrides += [f"run {entry.name}: {line}" for line in merge(target, entry, skip=("name",))]
    return Experiment(folder.resolve().name, folder, scale, param, overrides)


def _named(entries, name: str, path: Path, what: str):
    for entry in entries:
        if entry.name == name:
            return entry
    raise CaffeError(f"{path}: a scale overrides {what} '{name}', which the experiment does not define")


def check(param: experiment_pb2.ExperimentParameter, path: Path) -> None:
    """Names are unique, references resolve, files exist: every mistake before any work starts."""
    for what, entries in (("data stage", param.data), ("run", param.run), ("scale", param.scale)):
        names = [e.name for e in entries]
        if any(not n for n in names):
            raise CaffeError(f"{path}: every {what} needs a name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise CaffeError(f"{path}: {what} '{repeated[0]}' is defined twice")
    runs = {r.name for r in param.run}
    for run in param.run:
        if not run.solver and not run.HasField("probe"):
            raise CaffeError(f"{path}: run '{run.name}' names no solver")
        if run.solver and not (path.parent / run.solver).is_file():
            raise CaffeError(f"{path}: run '{run.name}': no such solver {path.parent / run.solver}")
        if run.weights and run.weights not in runs and not run.weights.endswith(".caffemodel"):
            raise CaffeError(f"{path}: run '{run.name}' takes its weights from '{run.weights}', "
                             "which is not a run (nor a .caffemodel)")
    if param.compare and param.compare not in runs:
        raise CaffeError(f"{path}: compare names '{param.compare}', which is not a run (nor a .caffemodel)")


def merge(target: pb_message.Message, override: pb_message.Message, skip: tuple[str, ...] = (), prefix: str = ""
          ) -> list[str]:
    """Set every field ``override`` sets onto ``target`` (messages recursively, repeated fields whole);
    one ``field = value`` line per change."""
    lines = []
    for field, value in override.ListFields():
        if field.name in skip:
            continue
        name = prefix + field.name
        if field.is_repeated:
            container = getattr(target, field.name)
            del container[:]
            if field.type == field.TYPE_MESSAGE:
                for item in value:
                    container.add().CopyFrom(item)
                lines.append(f"{name} = [{len(value)} entries]")
            else:
                container.extend(value)
                lines.append(f"{name} = {', '.join(_show(v) for v in value)}")
        elif field.type == field.TYPE_MESSAGE:
            lines += merge(getattr(target, field.name), value, prefix=name + ".")
        else:
            setattr(target, field.name, value)
            lines.append(f"{name} = {_show(value)}")
    return lines


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
