"""``egomotion train``: Caffe's ``Solver::Solve`` / ``Solver::Step`` loop, top to bottom.

Per iteration (``solver.cpp:Step``): zero the diffs → test when due → ``iter_size`` forward/backward
passes (diffs accumulate, the loss is their mean) → smoothed loss over ``average_loss`` iterations →
display → ``ApplyUpdate`` (``runner.solver``) → ``++iter`` → snapshot when due or asked by a signal.
After ``max_iter``: a final snapshot (unless one was just written), one more forward to display the
loss, a final test. Log lines are Caffe's, with glog prefixes and Caffe's ``file:line`` tags, so
``tools/extra/parse_log.py`` reads our logs; a CSV per run holds the same numbers.

Beyond Caffe: resuming with ``--snapshot`` also puts the data readers where the interrupted run had
them and reseeds torch per iteration, so on CPU a resumed run is bit-identical to an uninterrupted one;
a NaN or inf loss stops training after a snapshot named ``<prefix>_iter_<N>_nan``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import read_binary, read_net, read_solver, write_message
from converter.layers.loss import check_deferred_labels, deferred_label_checks
from converter.net import CaffeNet
from converter.weights import copy_trained_layers, load_weights, save_weights
from runner import distributed, threads
from runner.logs import Csv, Log, LogBridge
from runner.netsetup import check_training_memory, input_shapes, output_order, pick_device, share_trained_layers
from runner.solver import Solver, check_solver, fmt
from runner.solver_nets import test_nets, train_net
from runner.threads import usable_cpus

SIGNAL_EFFECTS = ("stop", "snapshot", "none")
LOSS_READ_EVERY = 50
"""On a GPU each iteration's loss stays on the device and the losses are read in one transfer at display
iterations and at least every this many iterations (a NaN is caught at most that late); on the CPU, where
reading costs nothing, every iteration."""

f32 = np.float32


# ----------------------------------------------------------------------------------------------
# The loop: run → Trainer.solve → Trainer.step → Trainer.forward_backward
# ----------------------------------------------------------------------------------------------
def run(sp: caffe_pb2.SolverParameter, path: str, opts: TrainOptions) -> Trainer:
    """Build and run a training; returns the (closed) trainer with its records, for callers and tests."""
    trainer = Trainer(sp, path, opts)
    try:
        trainer.solve()
    finally:
        trainer.close()
    return trainer


def remove_stale_partials(prefix: str) -> None:
    """Temporaries of snapshots a killed run never renamed (``.<name>_iter_N.*.partial``, see
    ``atomic_write_bytes``): incomplete by construction, and in nobody's way once removed."""
    folder, name = Path(prefix).parent, Path(prefix).name
    for stale in folder.glob(f".{glob.escape(name)}_iter_*.partial"):
        with contextlib.suppress(OSError):
            stale.unlink()


class Trainer:
    """Everything ``caffe train`` builds before ``Solve``: nets, data, solver, logs. Errors surface here,
    before any iteration runs."""

    # ------------------------------------------------------------------------------------------
    def solve(self) -> list[Record]:
        """``Solver::Solve``."""
        sp = self.sp
        self.log.line("solver.cpp:289", f"Solving {self.net.name}")
        self.log.line("solver.cpp:290", f"Learning Rate Policy: {sp.lr_policy}")
        self.signals = Signals(self.opts.sigint_effect, self.opts.sighup_effect)
        start, first = time.perf_counter(), self.solver.iter
        try:
            self.step(sp.max_iter - self.solver.iter)
            if self.rank == 0 and sp.snapshot_after_train and self.last_snapshot_iter != self.solver.iter \
                    and (not sp.snapshot or self.solver.iter % sp.snapshot != 0):
                self.snapshot()
            if self.stopped_early:
                self.log.line("solver.cpp:315", "Optimization stopped early.")
                return self.records
            it = self.solver.iter
            if sp.display and it % sp.display == 0:
                torch.manual_seed(seed_for(self.seed + self.rank, it))
                with torch.no_grad():
                    blobs = self.net(self.train_feeder.next())
                    loss = float(self.net.loss(blobs))
                smoothed = self.update_smoothed_loss(loss, it)
                self.log.line("solver.cpp:327", f"Iteration {it}, loss = {fmt(smoothed)}")
                self.records.append(Record(it, smoothed))
                self.csv.row(it, "train", "smoothed_loss", smoothed)
            if sp.test_interval and it % sp.test_interval == 0 and self.rank == 0:
                self.test_all()
            self.log_speed(it - first, time.perf_counter() - start)
            self.log.line("solver.cpp:332", "Optimization Done.")
            return self.records
        finally:
            self.signals.restore()
            self.csv.flush()

    def step(self, iters: int) -> None:
        """``Solver::Step``."""
        sp, solver = self.sp, self.solver
        stop_iter = solver.iter + iters
        self.start_iter = solver.iter  # Solver::Step's start_iter: the smoothed-loss ring restarts per call
        self.losses: list[np.float32] = []
        self.smoothed = f32(0)
        self.pending: list[tuple[int, torch.Tensor]] = []
        timer, iterations_last = time.perf_counter(), solver.iter
        self.progress_start = (time.perf_counter(), solver.iter, 0.0)
        while solver.iter < stop_iter:
            it = solver.iter
            for p in self.net.params:  # ClearParamDiffs
                if p.grad is not None:
                    p.grad.zero_()
            if sp.test_interval and it % sp.test_interval == 0 and (it > 0 or sp.test_initialization):
                if self.rank == 0:
                    self.test_all()
                if self.stopped_early:
                    break
            loss, blobs = self.forward_backward(it)
            self.pending.append((it, loss))
            display = bool(sp.display) and it % sp.display == 0
            bad = self.read_losses() if display or not self.defer_losses or len(self.pending) >= LOSS_READ_EVERY \
                else None
            smoothed = float(self.smoothed)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (it - iterations_last) / (lapse or 1)
                self.log.line("solver.cpp:239", f"Iteration {it} ({fmt(per_s)} iter/s, {fmt(lapse)}s/"
                                                f"{sp.display} iters), loss = {fmt(smoothed)}")
                timer, iterations_last = time.perf_counter(), it
                self.csv.row(it, "train", "smoothed_loss", smoothed)
                self.display_outputs(blobs, it)
            if bad:
                self.diverged(*bad, it)
            rate = solver.learning_rate()
            if display:
                self.log.line("sgd_solver.cpp:112", f"Iteration {it}, lr = {fmt(rate)}")
                self.records.append(Record(it, smoothed, rate))
                self.csv.row(it, "train", "lr", rate)
            solver.apply_update(rate)
            solver.iter += 1
            request = self.signals.request() if self.signals else "none"
            if self.rank == 0 and ((sp.snapshot and solver.iter % sp.snapshot == 0) or request == "snapshot"):
                self.snapshot()
            if request == "stop":
                self.stopped_early = True
                break
            self.show_progress(smoothed)
            threads.rebalance(self.log)
        bad = self.read_losses()
        if bad:
            self.diverged(*bad, solver.iter)

    def forward_backward(self, it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``iter_size`` × ``Net::ForwardBackward`` (diffs accumulate); the mean loss and the last pass's blobs.
        The loss stays a float32 scalar on the device (float sums and one division, as Caffe's host floats:
        IEEE single precision either side), so a GPU step never waits for it. Under DDP the gradients are
        all-reduced once, on the last pass, and the loss is averaged over the processes."""
        sp = self.sp
        torch.manual_seed(seed_for(self.seed + self.rank, it))  # Caffe seeds solver r with seed + r
        with deferred_label_checks(self.defer_losses):  # a GPU pass reads nothing back, labels included
            total, blobs = self.passes()
        self.last_blobs = blobs  # what pycaffe's solver.net.blobs shows after a step
        mean = total / sp.iter_size if sp.iter_size > 1 else total
        if self.ddp is not None:
            mean = distributed.mean_tensor(mean)
        return mean, blobs

    def passes(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ``iter_size`` passes of one iteration: their summed loss and the last pass's blobs."""
        sp, net = self.sp, self.net
        model = self.ddp or net
        total: torch.Tensor | None = None
        blobs: dict[str, torch.Tensor] = {}
        for i in range(sp.iter_size):
            batch = self.train_feeder.next()
            if self.graphed is None and self.opts.cuda_graph:
                self.graphed = self.capture(batch)
            if self.graphed:
                loss, blobs = self.graphed(batch)
                loss.backward()
                loss = loss.clone()  # the graph's buffer: the next pass overwrites it
            else:
                local = self.ddp is not None and i < sp.iter_size - 1
                with distributed.no_sync(self.ddp) if local else contextlib.nullcontext():
                    blobs = model(batch)
                    loss = net.loss(blobs)
                    if loss.requires_grad:
                        loss.backward()
            value = loss.detach().to(torch.float32).reshape(())
            total = value if total is None else total + value
        return total, blobs

    def capture(self, batch: dict[str, torch.Tensor]):
        """The pass captured as CUDA graphs (``--cuda-graph``), or False (and a log line) where capture fails:
        the run goes on eagerly."""
        from runner.cuda_graph import graph_pass

        try:
            graphed = graph_pass(self.net, batch, self.outputs)
        except Exception as e:  # noqa: BLE001 - torch's capture errors have no common type
            self.log.line("cuda_graph.py:1", f"CUDA graph capture failed ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''}); training eagerly", "W")
            return False
        self.log.line("cuda_graph.py:1", "Forward and backward captured as CUDA graphs (--cuda-graph)")
        return graphed

    def read_losses(self) -> tuple[int, float] | None:
        """The losses not yet read, brought to the host in one transfer and fed in order to Caffe's smoothed
        loss; the first (iteration, loss) that is not finite, if any."""
        if not self.pending:
            return None
        if self.defer_losses:
            check_deferred_labels(self.net.layers)
        iterations = [it for it, _ in self.pending]
        values = torch.stack([loss for _, loss in self.pending]).cpu().tolist()
        self.pending = []
        bad = None
        for it, value in zip(iterations, values, strict=True):
            self.update_smoothed_loss(value, it)
            if bad is None and not math.isfinite(value):
                bad = (it, value)
        return bad

    def __init__(self, sp: caffe_pb2.SolverParameter, path: str, opts: TrainOptions):
        from runner.data import NetFeeder

        self.sp, self.path, self.opts = sp, path, opts
        self.rank, self.world = distributed.rank(), distributed.world_size()
        root = self.rank == 0
        if opts.snapshot and opts.weights:
            raise CaffeError("give --snapshot or --weights, not both (Caffe refuses them together)")
        for name, effect in (("sigint_effect", opts.sigint_effect), ("sighup_effect", opts.sighup_effect)):
            if effect not in SIGNAL_EFFECTS:
                raise CaffeError(f"--{name} must be one of {', '.join(SIGNAL_EFFECTS)}, got '{effect}'")
        if opts.iterations is not None:
            if opts.iterations < 0:
                raise CaffeError(f"--iterations must be >= 0, got {opts.iterations}")
            sp.max_iter = opts.iterations
        if opts.level is not None:
            sp.train_state.level = opts.level
        if opts.stages:
            del sp.train_state.stage[:]
            sp.train_state.stage.extend(opts.stages)
        check_solver(sp, path)
        weights = [w for entry in (opts.weights or ([] if opts.snapshot else list(sp.weights)))
                   for w in entry.split(",") if w]
        for w in weights + ([opts.snapshot] if opts.snapshot else []):
            if not Path(w).is_file():
                raise CaffeError(f"{w}: no such file")
        if root:
            check_writable_folder(sp.snapshot_prefix)
            remove_stale_partials(sp.snapshot_prefix)
        self.prefix = sp.snapshot_prefix
        folder = Path(self.prefix).parent
        self.log = Log(opts.log or str(folder / "train.log"), append=bool(opts.snapshot), enabled=root and
                       not opts.quiet, progress=opts.progress, held=True)
        self.csv = Csv(None, False, time.time())
        self.signals: Signals | None = None
        self.feeders: list = []
        self.bridge = LogBridge(self.log)
        try:
            self.device = pick_device(opts.gpu, self.log)
            self.defer_losses = self.device.type == "cuda"
            if opts.cuda_graph and (self.device.type != "cuda" or self.world > 1):
                raise CaffeError("--cuda-graph needs one GPU (--gpu N): it captures CUDA kernels, and a multi-GPU "
                                 "run's gradients are all-reduced outside the graph")
            self.graphed = None
            self.seed = sp.random_seed if sp.random_seed >= 0 else int.from_bytes(os.urandom(4), "little")
            if sp.random_seed < 0:
                self.log.line("solver.cpp:48", f"random_seed not set: using {self.seed} (set it to reproduce)")
            self.log.line("solver.cpp:45", f"Initializing solver from parameters: \n{text_format.MessageToString(sp)}")
            generator = torch.Generator().manual_seed(self.seed)
            torch.manual_seed(self.seed)

            train_proto, _ = train_net(sp, path)
            self.log.line("solver.cpp:102", f"Creating training net for '{train_proto.name}'")
            self.net = CaffeNet(train_proto, input_shapes(train_proto, caffe_pb2.TRAIN), generator)
            self.test_protos = [proto for _, proto, _ in test_nets(sp, path)]
            self.test_nets = []
            for k, proto in enumerate(self.test_protos):
                self.log.line("solver.cpp:190", f"Creating test net (#{k}) for '{proto.name}'")
                net = CaffeNet(proto, input_shapes(proto, caffe_pb2.TEST), generator)
                self.test_nets.append(net)
            check_training_memory(self.net, self.test_nets, sp)
            for w in weights:  # caffe.cpp CopyLayers: the train net, then every test net
                self.log.line("solver.cpp:72", f"Finetuning from {w}")
                for net in [self.net, *self.test_nets]:
                    load_weights(net, w)
            for net in self.test_nets:
                share_trained_layers(net, self.net)
            self.net.to(self.device)
            for net in self.test_nets:
                net.to(self.device)
            for net in self.test_nets:  # .to() may have copied: share again on the device
                share_trained_layers(net, self.net)

            self.solver = Solver(sp, list(self.net.params), [lb.lr_mult for lb in self.net.learnable],
                                 [lb.decay_mult for lb in self.net.learnable], log=self.log.line)
            if opts.snapshot:
                self.restore(opts.snapshot)
            self.ddp = distributed.wrap(self.net, self.device) if self.world > 1 else None

            # Readers start where an interrupted run left them (Caffe restarts them at the first record):
            # iter·iter_size train batches, and test_iter batches per test run so far.
            it = self.solver.iter
            tests_done = sum(1 for t in range(0, it, sp.test_interval) if t > 0 or sp.test_initialization) \
                if sp.test_interval else 0
            self.train_feeder = NetFeeder(train_proto, caffe_pb2.TRAIN, seed=self.seed, rank=self.rank,
                                          world_size=self.world, workers=opts.workers, device=str(self.device),
                                          start_batch=it * sp.iter_size)
            self.feeders.append(self.train_feeder)
            self.test_feeders = []
            if root:
                for k, proto in enumerate(self.test_protos):
                    feeder = NetFeeder(proto, caffe_pb2.TEST, seed=self.seed, workers=opts.workers,
                                       device=str(self.device), start_batch=tests_done * sp.test_iter[k])
                    self.test_feeders.append(feeder)
                    self.feeders.append(feeder)
            self.batch = next(iter(self.net.input_shapes().values()), (1,))[0]
            self.outputs = output_order(self.net)
            self.loss_weights = dict(self.net.loss_blobs())
            self.records: list[Record] = []
            self.tests: list[tuple[int, int, str, float]] = []
            self.stopped_early = False
            self.last_blobs: dict[str, torch.Tensor] | None = None
            self.last_snapshot_iter = -1
            self.log.line("solver.cpp:57", "Solver scaffolding done.")
            self.csv = Csv((opts.csv or str(folder / "train.csv")) if root else None, bool(opts.snapshot),
                           time.time())
            self.log.release()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------
    def restore(self, state_file: str) -> None:
        """``Solver::Restore``: SolverState, then its ``learned_net`` weights (path as written, or beside it)."""
        st = read_binary(state_file, caffe_pb2.SolverState())
        learned = st.learned_net
        if learned and not Path(learned).is_file():
            beside = Path(state_file).parent / Path(learned).name
            if not beside.is_file():
                raise CaffeError(f"{state_file}: its learned_net '{learned}' does not exist (Caffe resumes from the "
                                 "file as written; keep the .caffemodel beside the .solverstate)")
            learned = str(beside)
        self.log.line("solver.cpp:306", f"Restoring previous solver status from {state_file}")
        if learned:
            copy_trained_layers(self.net, read_net(learned), learned)
        self.solver.restore(st, state_file)
        self.log.line("sgd_solver.cpp:326", "SGDSolver: restoring history")

    def update_smoothed_loss(self, loss: float, it: int) -> float:
        """``Solver::UpdateSmoothedLoss`` for iteration ``it`` (float arithmetic, a ring of ``average_loss``
        values)."""
        n = self.sp.average_loss
        if len(self.losses) < n:
            self.losses.append(f32(loss))
            size = len(self.losses)
            self.smoothed = f32((self.smoothed * f32(size - 1) + f32(loss)) / f32(size))
        else:
            idx = (it - self.start_iter) % n
            self.smoothed = f32(self.smoothed + (f32(loss) - self.losses[idx]) / f32(n))
            self.losses[idx] = f32(loss)
        return float(self.smoothed)

    def show_progress(self, smoothed: float) -> None:
        """On a terminal: iterations/s, images/s and the time left, at most five times a second."""
        now = time.perf_counter()
        start, start_iter, last = self.progress_start
        if not self.log.tty or now - last < 0.2:
            return
        self.progress_start = (start, start_iter, now)
        it, max_iter = self.solver.iter, self.sp.max_iter
        per_s = (it - start_iter) / max(now - start, 1e-9)
        left = (max_iter - it) / per_s if per_s else 0
        images = per_s * self.batch * self.sp.iter_size * self.world
        self.log.progress(f"iter {it}/{max_iter}  {per_s:.1f} it/s  {images:,.0f} images/s  loss {smoothed:.4g}  "
                          f"ETA {_duration(left)}")

    def log_speed(self, iterations: int, seconds: float) -> None:
        """The run's figures for its log: iterations and images per second (tests included) on which device."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            where = f"GPU {index} ({torch.cuda.get_device_name(index)}, peak memory {peak:.2f} GiB)"
        else:
            where = f"CPU ({torch.get_num_threads()} intra-op threads)"
        per_s = iterations / seconds if seconds > 0 else 0.0
        images = per_s * self.batch * self.sp.iter_size * self.world
        self.log.line("train.py:1", f"{iterations} iterations in {seconds:.1f} s: {per_s:.1f} iter/s, {images:,.0f} "
                                    f"images/s on {where}, {self.opts.workers} data worker(s)")

    def display_outputs(self, blobs: dict[str, torch.Tensor], it: int) -> None:
        """``Train net output #j: name = v (* w = w·v loss)`` for every element of every output blob."""
        index = 0
        for name in self.outputs:
            w = self.loss_weights.get(name, 0.0)
            values = blobs[name].detach().float().cpu().reshape(-1).numpy()
            for k, v in enumerate(values):
                extra = f" (* {fmt(w)} = {fmt(float(f32(w) * v))} loss)" if w else ""
                self.log.line("solver.cpp:258", f"    Train net output #{index}: {name} = {fmt(float(v))}{extra}")
                self.csv.row(it, "train", name if values.size == 1 else f"{name}[{k}]", float(v))
                index += 1

    # ------------------------------------------------------------------------------------------
    def test_all(self) -> None:
        for k in range(len(self.test_nets)):
            if self.stopped_early:
                break
            self.test(k)

    @torch.no_grad()
    def test(self, k: int) -> None:
        """``Solver::Test``: test_iter forwards, each output element averaged (float sums) over them."""
        sp, it = self.sp, self.solver.iter
        net, feeder = self.test_nets[k], self.test_feeders[k]
        self.log.line("solver.cpp:347", f"Iteration {it}, Testing net (#{k})")
        names = output_order(net)
        scores: np.ndarray | None = None
        loss = f32(0)
        for _ in range(sp.test_iter[k]):
            request = self.signals.request() if self.signals else "none"
            while request != "none":
                if request == "snapshot":
                    self.snapshot()
                elif request == "stop":
                    self.stopped_early = True
                request = self.signals.request()
            if self.stopped_early:
                break
            threads.rebalance(self.log)
            blobs = net(feeder.next())
            if sp.test_compute_loss:
                loss = f32(loss + f32(float(net.loss(blobs))))
            values = np.concatenate([blobs[n].detach().float().cpu().reshape(-1).numpy() for n in names]) \
                if names else np.zeros(0, f32)
            scores = values.astype(f32) if scores is None else (scores + values).astype(f32)
        if self.stopped_early:
            self.log.line("solver.cpp:388", "Test interrupted.")
            return
        if sp.test_compute_loss:
            self.log.line("solver.cpp:397", f"Test loss: {fmt(float(loss / f32(sp.test_iter[k])))}")
        if scores is None:
            return
        weights = dict(net.loss_blobs())
        owners = [(n, j, blobs[n].numel()) for n in names for j in range(blobs[n].numel())]
        for i, ((name, j, count), total) in enumerate(zip(owners, scores, strict=True)):
            mean = float(f32(total / f32(sp.test_iter[k])))
            w = weights.get(name, 0.0)
            extra = f" (* {fmt(w)} = {fmt(float(f32(w) * f32(mean)))} loss)" if w else ""
            self.log.line("solver.cpp:414", f"    Test net output #{i}: {name} = {fmt(mean)}{extra}")
            key = name if count == 1 else f"{name}[{j}]"
            self.tests.append((it, k, key, mean))
            self.csv.row(it, f"test{k}", key, mean)
        self.csv.flush()

    # ------------------------------------------------------------------------------------------
    def snapshot(self, suffix: str = "") -> str:
        """``Solver::Snapshot``: the .caffemodel first, then the .solverstate naming it (both atomic)."""
        base = f"{self.prefix}_iter_{self.solver.iter}{suffix}"
        model = base + ".caffemodel"
        self.log.line("solver.cpp:464", f"Snapshotting to binary proto file {model}")
        save_weights(self.net, model, with_diff=self.sp.snapshot_diff)
        state = base + ".solverstate"
        self.log.line("sgd_solver.cpp:284", f"Snapshotting solver state to binary proto file {state}")
        write_message(state, self.solver.state(model), binary=True)
        self.last_snapshot_iter = self.solver.iter
        return model

    def diverged(self, it: int, loss: float, now: int) -> None:
        """Stop on a NaN/inf loss at iteration ``it``, read before update ``now``: the weights kept are those
        of ``now`` (``it`` itself on the CPU, where every loss is read at once)."""
        model = self.snapshot("_nan") if self.rank == 0 else ""
        which = "before this iteration" if now == it else \
            f"before iteration {now} (on a GPU the loss is read every display or {LOSS_READ_EVERY} iterations)"
        raise CaffeError(f"the loss is {fmt(loss)} at iteration {it}: training stopped; the weights and solver "
                         f"state {which} are in {model} and {model[:-len('.caffemodel')]}.solverstate")

    def close(self) -> None:
        for feeder in self.feeders:
            feeder.close()
        self.feeders = []
        if self.signals:
            self.signals.restore()
        self.bridge.detach()
        errors = []
        for closer in (self.csv.close, self.log.close):
            try:
                closer()
            except CaffeError as e:
                errors.append(e)
        if errors and sys.exc_info()[0] is None:  # while another error propagates, that one is the message
            raise errors[0]


# ----------------------------------------------------------------------------------------------
# The verb, options and signals
# ----------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    """The ``egomotion train`` verb."""
    if args.snapshot and args.weights:
        raise CaffeError("give --snapshot or --weights, not both (Caffe refuses them together)")
    if args.workers is None:  # a GPU waits for data read in its own process: read ahead in workers
        args.workers = min(4, usable_cpus() - 1) if args.gpu else 0
    if args.workers < 0:
        raise CaffeError(f"--workers must be >= 0 (0: read data in the main process), got {args.workers}")
    opts = TrainOptions(weights=[args.weights] if args.weights else [], snapshot=args.snapshot, gpu=args.gpu,
                        iterations=args.iterations, sigint_effect=args.sigint_effect,
                        sighup_effect=args.sighup_effect, level=args.level,
                        stages=[s for s in (args.stage or "").split(",") if s], log=args.log, csv=args.csv,
                        workers=args.workers, cuda_graph=args.cuda_graph)
    sp = read_solver(args.solver)
    check_solver(sp, args.solver)
    if distributed.wants_spawn(args.gpu):
        return distributed.spawn(args.gpu, args.entry, args.argv)
    with distributed.process_group(opts.gpu):
        run(sp, args.solver, opts)
    return 0


@dataclass
class TrainOptions:
    weights: list[str] = field(default_factory=list)
    snapshot: str | None = None
    gpu: str | None = None
    iterations: int | None = None  # overrides max_iter
    sigint_effect: str = "stop"
    sighup_effect: str = "snapshot"
    level: int | None = None
    stages: list[str] = field(default_factory=list)
    log: str | None = None  # default: train.log beside the snapshots
    csv: str | None = None  # default: train.csv beside the snapshots
    progress: bool | None = None  # default: when stderr is a terminal
    workers: int = 0
    quiet: bool = False
    cuda_graph: bool = False  # forward and backward captured as CUDA graphs (runner/cuda_graph.py)


class Signals:
    """Caffe's ``SignalHandler``: SIGINT/SIGHUP become STOP / SNAPSHOT / NONE requests polled by the loop.

    A second SIGINT while a stop is pending aborts at once (KeyboardInterrupt).
    """

    def __init__(self, sigint: str, sighup: str):
        self.effects = {signal.SIGINT: sigint}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup
        self.pending: list[str] = []
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.effects:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        effect = self.effects.get(signum, "none")
        if signum == signal.SIGINT and "stop" in self.pending:
            raise KeyboardInterrupt
        if effect != "none":
            self.pending.append(effect)

    def request(self) -> str:
        """``GetRequestedAction``: the oldest pending request, or "none"."""
        return self.pending.pop(0) if self.pending else "none"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


@dataclass
class Record:
    """What one display printed (for tests and callers)."""

    iter: int
    loss: float
    lr: float | None = None


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def check_writable_folder(prefix: str) -> None:
    """Caffe's ``CheckSnapshotWritePermissions``, done for every run since we always may snapshot."""
    folder = Path(prefix).parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CaffeError(f"snapshot_prefix '{prefix}': cannot write in folder '{folder}' "
                         f"({e.strerror or e}); make sure the folder exists and is writable") from None


def seed_for(seed: int, it: int) -> int:
    """The torch seed of iteration ``it``: derived, so a resumed run draws what the original drew."""
    return (seed * 1_000_003 + it * 7_919 + 1) % (2**63 - 1)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
