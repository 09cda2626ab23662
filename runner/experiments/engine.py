"""One engine for every experiment folder: ``python -m runner.experiments train|eval EXPERIMENT``.

``train`` makes the data stages and trains the TRAIN-stage runs; ``eval`` trains the EVAL-stage runs
(fine-tuning grids, probes) and writes ``runs/<experiment>/<scale>/results.{md,csv}`` and plots. Every
training is a plain ``egomotion train`` of prototxts the engine resolves into the run folder:

    runs/<experiment>/<scale>/<run>/[<labels>_seed<seed>/]
        net.prototxt, solver.prototxt   the experiment's files with data paths, batch sizes and the scale's
                                        overrides applied: ``egomotion train --solver solver.prototxt`` reruns it
        overrides.txt                   every value the scale (or the grid) changed, one per line
        train.log, train.csv            Caffe's log and the numbers behind it
        test.log                        the final measure (``egomotion test`` over the whole test set)
        curves.png                      loss, lr and test outputs over the iterations (a training run)
        snap_iter_N.caffemodel/.solverstate, CHOSEN (the snapshot the rule picked), result.json

A run folder that holds snapshots resumes from the newest one; a run with ``CHOSEN`` or ``result.json`` is
done and is not trained again. Nothing here holds a value a net trains with: it is all in the folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter import caffe_pb2, experiment_pb2
from converter.errors import CaffeError
from converter.io import read_net, read_solver, write_message
from runner import threads as cpu_threads
from runner.curves import last_values, read_curves
from runner.experiments import data_stages
from runner.experiments.spec import Experiment, merge

Rule = experiment_pb2.SnapshotRule


def say(text: str) -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class Job:
    """One training of a run: the run's name and, in a grid, its label count and seed."""

    run: str
    labels: int | None = None
    seed: int | None = None

    def label(self) -> str:
        return self.run if self.labels is None else f"{self.run} {self.labels} labels seed {self.seed}"


@dataclass(frozen=True)
class Place:
    """Where an experiment at one scale keeps its data and runs."""

    runs: Path
    data: Path

    @staticmethod
    def of(exp: Experiment, runs: str | Path = "runs", data: str | Path = "data") -> Place:
        return Place(Path(runs) / exp.name / exp.scale, Path(data) / exp.name / exp.scale)

    def folder(self, job: Job) -> Path:
        base = self.runs / job.run
        return base if job.labels is None else base / f"{job.labels}_seed{job.seed}"


def jobs_of(run: experiment_pb2.RunParameter) -> list[Job]:
    if not run.label_count:
        return [Job(run.name)]
    seeds = list(run.seed) or [run.solver_override.random_seed]
    return [Job(run.name, n, s) for n in run.label_count for s in seeds]


# ----------------------------------------------------------------------------------------------------
# Resolving a run's prototxts
# ----------------------------------------------------------------------------------------------------
def resolve(exp: Experiment, place: Place, job: Job) -> Path:
    """Write the run folder's net.prototxt, solver.prototxt and overrides.txt; return the solver's path."""
    run = exp.run(job.run)
    folder = place.folder(job)
    folder.mkdir(parents=True, exist_ok=True)
    solver_file = exp.path(run.solver)
    solver = read_solver(solver_file)
    # The net is the experiment folder's file of the name the solver gives (so a copied folder trains its
    # own copy of the net, whatever folder the solver's path names).
    net_file = exp.path(Path(solver.net).name)
    net = read_net(net_file)
    notes = [f"{line}" for line in exp.overrides if line.startswith(f"run {run.name}:")]
    fill = {"labels": job.labels, "seed": job.seed}
    for lp in net.layer:
        _retarget(lp, exp, place, fill, f"{net_file}: layer '{lp.name}'")
        phases = {r.phase for r in lp.include if r.HasField("phase")}
        for phase, size in ((caffe_pb2.TRAIN, run.train_batch_size), (caffe_pb2.TEST, run.test_batch_size)):
            if size and phase in phases and lp.type in ("Data", "ImageData"):
                _data_param(lp).batch_size = size
    override = experiment_pb2.RunParameter().solver_override
    override.CopyFrom(run.solver_override)
    if job.seed is not None and run.seed_solver:
        override.random_seed = job.seed
        notes.append(f"grid: labels {job.labels}, seed {job.seed} (random_seed = {job.seed})")
    merge(solver, override)
    solver.net = str(folder / "net.prototxt")
    solver.snapshot_prefix = str(folder / "snap")
    write_message(folder / "net.prototxt", net)
    write_message(folder / "solver.prototxt", solver)
    (folder / "overrides.txt").write_text(
        f"# {exp.name} at scale {exp.scale}: {solver_file} and {net_file}, changed as follows\n"
        + "".join(f"{line}\n" for line in notes or ["(nothing)"]))
    return folder / "solver.prototxt"


def _data_param(lp: caffe_pb2.LayerParameter):
    return lp.image_data_param if lp.type == "ImageData" else lp.data_param


def _retarget(lp: caffe_pb2.LayerParameter, exp: Experiment, place: Place, fill: dict, where: str) -> None:
    """Data paths under the experiment's data_root move to this scale's data folder; {labels} and {seed}
    take the grid's values."""
    root = exp.param.data_root.rstrip("/")

    def moved(path: str) -> str:
        if root and (path == root or path.startswith(root + "/")):
            path = str(place.data) + path[len(root):]
        if "{" in path:
            missing = [k for k, v in fill.items() if "{" + k + "}" in path and v is None]
            if missing:
                raise CaffeError(f"{where}: '{path}' names {{{missing[0]}}}, but this run is not a grid")
            path = path.format(**{k: v for k, v in fill.items() if v is not None})
        return path

    if lp.type in ("Data", "ImageData"):
        param = _data_param(lp)
        if param.source:
            param.source = moved(param.source)
    if lp.transform_param.mean_file:
        lp.transform_param.mean_file = moved(lp.transform_param.mean_file)


# ----------------------------------------------------------------------------------------------------
# Training, the snapshot rule, the measure
# ----------------------------------------------------------------------------------------------------
def snapshots(folder: Path, suffix: str) -> dict[int, Path]:
    """``{N: snap_iter_N<suffix>}`` in ``folder`` (``.caffemodel`` or ``.solverstate``)."""
    found = {}
    for path in folder.glob(f"snap_iter_*{suffix}"):
        it = path.name.removeprefix("snap_iter_").removesuffix(suffix)
        if it.isdigit():
            found[int(it)] = path
    return found


def train(solver_path: Path, weights: Path | None, gpu: str | None = None, workers: int = 0) -> None:
    """``egomotion train [--weights W] [--gpu G --workers N]`` in this process, its console output into the
    run folder. A folder that holds snapshots resumes from the newest (``--snapshot``), appending to the log
    and CSV."""
    from runner.train import TrainOptions, run

    folder = solver_path.parent
    states = snapshots(folder, ".solverstate")
    if states:
        say(f"{folder}: resuming from {states[max(states)].name}")
        opts = TrainOptions(snapshot=str(states[max(states)]), gpu=gpu, workers=workers)
    else:
        opts = TrainOptions(weights=[str(weights)] if weights else [], gpu=gpu, workers=workers)
    with open(folder / "console.txt", "a" if states else "w") as console, contextlib.redirect_stderr(console):
        run(read_solver(solver_path), str(solver_path), opts)


def choose_snapshot(folder: Path, rule: experiment_pb2.SnapshotRule) -> Path:
    """The snapshot ``rule`` names, from the run's snapshots and its train.csv."""
    snaps = snapshots(folder, ".caffemodel")
    if not snaps:
        raise CaffeError(f"{folder}: no snapshot to choose from (is snapshot 0 in the solver?)")
    if rule.rule == Rule.LAST:
        return snaps[max(snaps)]
    if rule.rule == Rule.LAST_RECORDED:
        max_iter = read_solver(folder / "solver.prototxt").max_iter
        before = [it for it in snaps if it < max_iter]
        return snaps[max(before)] if before else snaps[max(snaps)]
    curves = read_curves(folder / "train.csv")
    if rule.rule == Rule.LOWEST_TRAIN_LOSS:
        values = {it: v for it, v in last_values(curves.get("train smoothed_loss", [])).items() if it in snaps}
        return snaps[min(values, key=values.get)] if values else snaps[max(snaps)]
    values = {it: v for it, v in last_values(curves.get(f"test0 {rule.output}", [])).items() if it in snaps}
    if not values:
        raise CaffeError(f"{folder}: the snapshot rule BEST_TEST needs test '{rule.output}' at a snapshot iteration")
    return snaps[max(values, key=values.get)]


def test_iterations(net_path: Path) -> tuple[str, int]:
    """(the TEST Data layer's source, batches covering every record once): ``egomotion test`` of that many
    iterations scores the whole test set."""
    from data_prep.lmdb_io import LMDBReader

    net = read_net(net_path)
    for lp in net.layer:
        if lp.type == "Data" and any(r.phase == caffe_pb2.TEST for r in lp.include):
            with LMDBReader(lp.data_param.source) as reader:
                return lp.data_param.source, math.ceil(len(reader) / lp.data_param.batch_size)
    raise CaffeError(f"{net_path}: no TEST-phase Data layer to measure on")


def measure(folder: Path, weights: Path, spec: experiment_pb2.Measure, gpu: str | None = None) -> dict:
    """``egomotion test`` of the final weights over the whole test set (its log in test.log): the mean over
    every batch and the last batch alone; with best_test also the best test output during training."""
    from runner.logs import Log
    from runner.test_cmd import score

    source, iterations = test_iterations(folder / "net.prototxt")
    with open(folder / "console.txt", "a") as console, contextlib.redirect_stderr(console):
        log = Log(str(folder / "test.log"))
        try:
            result = score(str(folder / "net.prototxt"), [str(weights)], iterations, gpu=gpu, log=log)
        finally:
            log.close()
    if spec.output not in result.means:
        raise CaffeError(f"{folder / 'net.prototxt'}: the TEST net has no output '{spec.output}' "
                         f"(outputs: {', '.join(result.means)})")
    out = {"value": result.means[spec.output], "last_batch": result.last[spec.output], "test_batches": iterations}
    if spec.best_test:
        during = [v for _, v in read_curves(folder / "train.csv").get(f"test0 {spec.output}", [])]
        out["best_test"] = max([out["value"], *during])
    return out


def feature_activity(folder: Path, weights: Path, blob: str) -> float:
    """The fraction of ``blob``'s features (per-image entries) that are not 0 for every image of the first
    TEST batch, with ``weights`` (the run's solver's test state picks the layers)."""
    import torch

    from converter.io import filter_net, net_state
    from converter.net import CaffeNet
    from converter.weights import load_weights
    from runner.data import NetFeeder
    from runner.netsetup import input_shapes

    sp = read_solver(folder / "solver.prototxt")
    stages = list(sp.test_state[0].stage) if sp.test_state else []
    proto = filter_net(read_net(folder / "net.prototxt"), net_state("TEST", 0, stages))
    net = CaffeNet(proto, input_shapes(proto, caffe_pb2.TEST))
    load_weights(net, weights)
    net.eval()
    with NetFeeder(proto, caffe_pb2.TEST) as feeder, torch.no_grad():
        values = net(feeder.next())
    if blob not in values:
        raise CaffeError(f"{folder / 'net.prototxt'}: feature_blob '{blob}' is not a blob of the TEST net")
    x = values[blob].reshape(values[blob].shape[0], -1)
    return float((x != 0).any(dim=0).float().mean())


def weights_for(exp: Experiment, place: Place, run: experiment_pb2.RunParameter) -> Path | None:
    """The snapshot this run starts from: another run's chosen one, or a file (``{scale}`` filled in)."""
    if not run.weights:
        return None
    if any(r.name == run.weights for r in exp.param.run):
        marker = place.folder(Job(run.weights)) / "CHOSEN"
        if not marker.exists():
            raise CaffeError(f"run '{run.name}' needs the pre-trained '{run.weights}' ({marker} is missing): "
                             f"run `make train EXP={exp.name} SCALE={exp.scale}` first")
        return Path(marker.read_text().strip())
    path = Path(run.weights.format(scale=exp.scale))
    if not path.is_file():
        raise CaffeError(f"run '{run.name}': no pre-trained weights {path}")
    return path


_WORKER_GPU: list[str] = []  # the one GPU of this job process, when several GPUs run jobs side by side


def init_job_process(threads: int, gpus: list[int], counter) -> None:
    """A job process's set-up: its intra-op threads (registered as a fixed count, so automatic egomotion jobs
    on the machine leave them their cores) and, with GPUs, the next one in turn (``counter`` is a shared
    ``multiprocessing.Value``), so the processes running side by side each have a GPU of their own."""
    cpu_threads.start(threads)
    if gpus:
        with counter.get_lock():
            k = counter.value
            counter.value += 1
        _WORKER_GPU[:] = [str(gpus[k % len(gpus)])]


def job_gpu(gpu: str | None) -> str | None:
    """The one GPU a job uses: its process's own (:func:`init_job_process`), else the first of ``--gpu``."""
    from runner.distributed import parse_gpus

    if _WORKER_GPU:
        return _WORKER_GPU[0]
    ids = parse_gpus(gpu)
    return str(ids[0]) if ids else None


def run_job(experiment: str, scale: str, runs: str, data: str, job: Job, gpu: str | None = None,
            data_workers: int = 0) -> dict:
    """Train one job (resuming or skipping what is done) and return its record: the chosen snapshot of a
    training run, the measure of a grid run. Takes names, not objects, so it can run in a worker process.
    With ``gpu``, the job runs on one GPU (:func:`job_gpu`), its data read by ``data_workers`` processes."""
    from runner.experiments.spec import load

    gpu = job_gpu(gpu)
    exp = load(experiment, scale)
    place = Place.of(exp, runs, data)
    run = exp.run(job.run)
    folder = place.folder(job)
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    start = time.perf_counter()
    if run.HasField("probe"):
        from runner.experiments.probes import run_probe

        record = {"run": job.run, "labels": None, "seed": None,
                  "probes": run_probe(exp, place.data, folder, run, gpu), "seconds": round(time.perf_counter() - start)}
        result_file.write_text(json.dumps(record))
        return record
    solver = resolve(exp, place, job)
    train(solver, weights_for(exp, place, run), gpu, data_workers if gpu else 0)
    rule = run.snapshot_rule if run.HasField("snapshot_rule") else exp.param.snapshot_rule
    record = {"run": job.run, "labels": job.labels, "seed": job.seed, "seconds": round(time.perf_counter() - start)}
    if run.HasField("measure"):
        final = snapshots(folder, ".caffemodel")
        record.update(measure(folder, final[max(final)], run.measure, gpu), snapshot=final[max(final)].name)
    else:
        from runner.plot import draw, parse_log

        draw(parse_log(folder / "train.log"), folder / "curves.png", f"{exp.name} {run.name} ({exp.scale})")
        chosen = choose_snapshot(folder, rule)
        (folder / "CHOSEN").write_text(f"{chosen}\n")
        record.update(snapshot=chosen.name, rule=Rule.Rule.Name(rule.rule))
        if run.feature_blob:
            record["alive"] = feature_activity(folder, chosen, run.feature_blob)
            if record["alive"] == 0:
                say(f"{run.name}: WARNING every feature of '{run.feature_blob}' is 0 on a test batch: a dead tower")
        if run.final_copy:
            import shutil

            shutil.copyfile(chosen, place.runs / f"{run.name}.caffemodel")
    result_file.write_text(json.dumps(record))
    return record


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------
def run_jobs(fn: Callable, jobs: list[tuple], workers: int, threads: int, done: Callable,
             gpus: list[int] | None = None) -> list:
    """``fn(*job)`` for every job, ``workers`` at a time (in spawned processes when more than one, each with
    a GPU of ``gpus`` in turn), each on ``threads`` intra-op threads; ``done(k, job, result)`` as each ends.
    Results come back in the jobs' order.

    The thread count is the run's own, never derived from ``workers``: a convolution's weight gradient sums
    over the batch in thread-sized slices, so its last bits depend on the threads, and ``--jobs`` must not
    change a number (as Caffe's prefetch threads never do)."""
    results: dict[int, object] = {}
    if workers <= 1:
        with cpu_threads.chosen(threads):
            for k, job in enumerate(jobs):
                results[k] = fn(*job)
                done(len(results), job, results[k])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_job_process,
                                 initargs=(threads, gpus or [], context.Value("i", 0))) as pool:
            futures = {pool.submit(fn, *job): k for k, job in enumerate(jobs)}
            for future in as_completed(futures):
                k = futures[future]
                results[k] = future.result()
                done(len(results), jobs[k], results[k])
    return [results[k] for k in range(len(jobs))]


def stage_jobs(exp: Experiment, stage: int) -> list[Job]:
    return [job for run in exp.param.run if run.stage == stage for job in jobs_of(run)]


def make_data(exp: Experiment, place: Place) -> None:
    """Every data stage, made once per scale: a missing folder (IMAGENET_DIR, say) stops the experiment
    before any run spends its time."""
    for stage in exp.param.data:
        data_stages.make(stage, place.data, say)


def train_stage(exp: Experiment, place: Place, workers: int, threads: int, gpu: str | None) -> list[dict]:
    make_data(exp, place)
    return _run_stage(exp, place, experiment_pb2.RunParameter.TRAIN, workers, threads, gpu)


def _run_stage(exp: Experiment, place: Place, stage: int, workers: int, threads: int, gpu: str | None
               ) -> list[dict]:
    jobs = stage_jobs(exp, stage)
    start = time.perf_counter()
    for job in jobs:
        if job.labels is None and not (place.folder(job) / "result.json").exists():
            say(f"{job.run}: training (log: {place.folder(job) / 'train.log'})")

    def done(k: int, args: tuple, record: dict) -> None:
        job = args[4]
        elapsed = time.perf_counter() - start
        what = (f"{record['value']:.4f} (last batch {record['last_batch']:.3f})" if "value" in record
                else f"{len(record['probes'])} probes" if "probes" in record
                else f"{record['snapshot']} ({record['rule']})")
        eta = elapsed / k * (len(jobs) - k)
        say(f"[{k}/{len(jobs)}] {job.label()}: {what}; {record['seconds']} s; ETA {eta:.0f} s")

    from runner.distributed import parse_gpus

    gpus = parse_gpus(gpu)
    # a GPU job reads its data in worker processes: the machine's CPUs shared by the jobs side by side
    data_workers = min(4, max(1, cpu_threads.usable_cpus() // max(1, min(workers, len(jobs))) - 1)) if gpus else 0
    args = [(str(exp.folder), exp.scale, str(place.runs.parents[1]), str(place.data.parents[1]), job, gpu,
             data_workers) for job in jobs]
    return run_jobs(run_job, args, workers, threads, done, gpus)


def eval_stage(exp: Experiment, place: Place, workers: int, threads: int, gpu: str | None) -> list[dict]:
    from runner.experiments.results import write_results

    missing = [r.name for r in exp.param.run if r.stage == experiment_pb2.RunParameter.TRAIN
               and not all((place.folder(j) / "CHOSEN").exists() for j in jobs_of(r))]
    if missing:
        raise CaffeError(f"no pre-trained {', '.join(missing)} in {place.runs}: "
                         f"run `make train EXP={exp.name} SCALE={exp.scale}` first")
    make_data(exp, place)
    records = _run_stage(exp, place, experiment_pb2.RunParameter.EVAL, workers, threads, gpu)
    say(write_results(exp, place, records))
    return records
