"""Batches read ahead in worker processes and handed over through a ring of shared-memory slots.

Why not torch's DataLoader: each batch it returns arrives in new shared-memory segments (made by the
worker, then opened and mapped by the trainer). On the 2-core machine that cost the training process
1.2 ms per MNIST batch of 125 pairs, and a worker delivered 32k pairs/s where the same code in-process
makes 72k. Here the slots are allocated once, before the workers start; a worker writes batch ``b``'s data
tops straight into a free slot and sends only ``(b, slot)``. A thread of the trainer's process takes the
batches in order, copies each out of its slot (a caller may keep a batch after asking for the next one) —
into pinned memory when the batch goes on to a GPU, so that copy is asynchronous, else into a tensor used
again once the caller has let go of it (:class:`BufferPool`) — hands the slot to the next batch, and keeps
up to two batches ready: the training step only takes one from a queue.

Batches come back in order ``start, start+1, …`` whichever worker made them, and every batch's randomness
comes from its index, so the worker count never changes a number.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable

import numpy as np
import torch

from converter.errors import CaffeError

Batch = dict[str, torch.Tensor]
POLL_SECONDS = 1.0
"""How often a waiting trainer checks that its workers live, and a waiting worker that its trainer does."""


def _work(make: Callable[[int, Batch], Batch], slots: list[Batch], tasks, done, init: Callable[[], None],
          parent: int) -> None:
    """A worker: takes ``(batch, slot)`` tasks until it gets None or its trainer is gone."""
    for name in ("SIGINT", "SIGHUP"):  # the trainer decides what a signal means (stop, snapshot)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    init()
    while True:
        try:
            task = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        b, slot = task
        try:
            target = slots[slot]
            batch = make(b, target)  # the data tops are written into the slot itself
            if batch.keys() == target.keys() and all(v.shape == target[k].shape for k, v in batch.items()):
                for k, v in batch.items():
                    if v.data_ptr() != target[k].data_ptr():  # the small ones (labels)
                        target[k].copy_(v)
                done.put((b, slot, "slot", None))
            else:  # a batch of another shape (ImageData images of varying size at batch 1): sent whole
                done.put((b, slot, "whole", batch))
        except CaffeError as e:
            done.put((b, slot, "error", str(e)))
        except Exception as e:  # noqa: BLE001 - a bug: the trainer raises it with its type and text
            done.put((b, slot, "bug", f"{type(e).__name__}: {e}"))


class BufferPool:
    """Batch tensors handed out again once nothing outside the pool refers to them.

    Why: a new tensor per batch is memory that malloc maps afresh (a batch is far above its mmap threshold)
    and the kernel then faults in page by page. For a batch of 60 KITTI colour pairs (74 MB) writing the
    batch took 44 ms into a new tensor against 8 ms into one written before. A kept tensor is free when no
    Python name, view, numpy array or autograd node holds it (torch's use counts of the tensor and of its
    storage); otherwise a new one is made, and up to ``keep`` per shape are kept. Where torch lacks those
    counts nothing is kept. Pinned memory is not pooled: torch's caching host allocator already keeps it,
    and knows when an asynchronous copy out of it has finished."""

    COUNTED = hasattr(torch.Tensor, "_use_count") and hasattr(torch._C, "_storage_Use_Count")

    def __init__(self, keep: int = 6):
        self.keep = keep
        self.kept: dict[tuple, list[torch.Tensor]] = {}
        # The counts of a tensor nobody else holds, measured the way take() measures: interpreters differ in
        # the references they count while an expression is evaluated, torch in its storage wrappers.
        probe = [torch.empty(1)]
        self.alone = (self._refs(probe, 0), *self._torch_refs(probe[0])) if self.COUNTED else None

    @staticmethod
    def _refs(items: list, i: int) -> int:
        return sys.getrefcount(items[i])

    @staticmethod
    def _torch_refs(t: torch.Tensor) -> tuple[int, int]:
        """References to the tensor's TensorImpl (a view keeps its base, autograd its saved tensors) and to its
        storage (views, numpy arrays)."""
        return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of this shape and dtype that nobody else holds (its contents are stale)."""
        if not self.COUNTED:
            return torch.empty(shape, dtype=dtype)
        kept = self.kept.setdefault((tuple(shape), dtype), [])
        for i in range(len(kept)):
            if (self._refs(kept, i), *self._torch_refs(kept[i])) == self.alone:
                return kept[i]
        fresh = torch.empty(shape, dtype=dtype)
        if len(kept) < self.keep:
            kept.append(fresh)
        return fresh


def _copy_out(slot: torch.Tensor, pin: bool, pool: BufferPool) -> torch.Tensor:
    """The slot's batch in a tensor of the trainer's own: one memcpy (numpy's, single-threaded: torch's copy
    would wake its OpenMP team, which on a small machine waits for the core a worker is using)."""
    out = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=True) if pin else pool.take(slot.shape, slot.dtype)
    np.copyto(out.numpy(), slot.numpy())
    return out


class Prefetcher:
    """``workers`` processes computing ``make(b, slot)`` for ``b = start, start+1, …`` into ``depth`` slots of
    the given tops' shapes; :meth:`next` returns the batches in order as the trainer's own tensors."""

    READY = 2
    """Batches copied out and waiting for the step."""

    def __init__(self, make: Callable[[int, Batch], Batch], shapes: dict[str, tuple[int, ...]], start: int,
                 workers: int, depth: int, init: Callable[[], None], pin: bool):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.slots = [{t: torch.empty(s, dtype=torch.float32).share_memory_() for t, s in shapes.items()}
                      for _ in range(depth)]
        self.tasks, self.done = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_work, daemon=True, name=f"egomotion-data-{i}",
                                  args=(make, self.slots, self.tasks, self.done, init, os.getpid()))
                      for i in range(workers)]
        for p in self.procs:
            p.start()
        self.pin = pin
        self.pool = BufferPool()
        self.submitted = start
        for slot in range(depth):
            self._submit(slot)
        self.ready: queue.Queue = queue.Queue(self.READY)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._hand_over, args=(start,), daemon=True, name="egomotion-batches")
        self.thread.start()

    def _submit(self, slot: int) -> None:
        self.tasks.put((self.submitted, slot))
        self.submitted += 1

    def _check_workers(self, b: int) -> None:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None:
                how = f"exit code {p.exitcode}"
                if p.exitcode < 0:
                    try:
                        how = signal.Signals(-p.exitcode).name
                    except ValueError:
                        how = f"signal {-p.exitcode}"
                raise CaffeError(f"data worker {i} (pid {p.pid}) died ({how}) while reading batch {b}; "
                                 "is the machine out of memory?")

    def _hand_over(self, b: int) -> None:
        """The thread: batch ``b``, ``b+1``, … from the workers, each copied out of its slot (the slot then
        goes to the next batch) and queued for :meth:`next`; an error is queued in its batch's place."""
        arrived: dict[int, tuple] = {}
        try:
            while not self.stopping.is_set():
                while b not in arrived:
                    try:
                        item = self.done.get(timeout=0.1)
                    except queue.Empty:
                        if self.stopping.is_set():
                            return
                        self._check_workers(b)
                        continue
                    arrived[item[0]] = item
                _, slot, kind, payload = arrived.pop(b)
                if kind == "error":
                    raise CaffeError(payload)
                if kind == "bug":
                    raise RuntimeError(f"data worker, batch {b}: {payload}")
                if kind == "slot":
                    payload = {t: _copy_out(v, self.pin, self.pool) for t, v in self.slots[slot].items()}
                self._submit(slot)
                self._put(payload)
                b += 1
        except Exception as e:  # noqa: BLE001 - handed to the trainer, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> Batch:
        while True:
            try:
                item = self.ready.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the data hand-over thread stopped") from None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def close(self) -> None:
        """Stop the thread and the workers (at once: a batch being read is dropped) and free the queues."""
        self.stopping.set()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        self.thread.join(timeout=5)
        for p in self.procs:
            p.join(timeout=5)
        for q in (self.tasks, self.done):
            q.cancel_join_thread()
            q.close()
        self.procs = []
