"""Batches read ahead in worker processes and handed over through a ring of shared-memory slots.

Why not torch's DataLoader: each batch it returns arrives in new shared-memory segments (made by the
worker, then opened and mapped by the trainer). On the 2-core machine that cost the training process
1.2 ms per MNIST batch of 125 pairs, and a worker delivered 32k pairs/s where the same code in-process
makes 72k. Here the slots are allocated once, before the workers start; a worker writes batch ``b`` into
a free slot and sends only ``(b, slot)``; the trainer copies the slot out (a caller may keep a batch after
asking for the next one) — into pinned memory when the batch goes on to a GPU, so that copy is
asynchronous — and hands the slot straight to the next batch.

Batches come back in order ``start, start+1, …`` whichever worker made them, and every batch's randomness
comes from its index, so the worker count never changes a number.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Callable

import numpy as np
import torch

from converter.errors import CaffeError

Batch = dict[str, torch.Tensor]
POLL_SECONDS = 1.0
"""How often a waiting trainer checks that its workers live, and a waiting worker that its trainer does."""


def _work(make: Callable[[int], Batch], slots: list[Batch], tasks, done, init: Callable[[], None],
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
            batch = make(b)
            target = slots[slot]
            if batch.keys() == target.keys() and all(v.shape == target[k].shape for k, v in batch.items()):
                for k, v in batch.items():
                    target[k].copy_(v)
                done.put((b, slot, "slot", None))
            else:  # a batch of another shape (ImageData images of varying size at batch 1): sent whole
                done.put((b, slot, "whole", batch))
        except CaffeError as e:
            done.put((b, slot, "error", str(e)))
        except Exception as e:  # noqa: BLE001 - a bug: the trainer raises it with its type and text
            done.put((b, slot, "bug", f"{type(e).__name__}: {e}"))


def _copy_out(slot: torch.Tensor, pin: bool) -> torch.Tensor:
    """The slot's batch in a tensor of the trainer's own: one memcpy (numpy's, single-threaded: torch's copy
    would wake its OpenMP team, which on a small machine waits for the core a worker is using)."""
    out = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=pin)
    np.copyto(out.numpy(), slot.numpy())
    return out


class Prefetcher:
    """``workers`` processes computing ``make(b)`` for ``b = start, start+1, …`` into ``depth`` slots of the
    given tops' shapes; :meth:`next` returns them in order as the trainer's own tensors."""

    def __init__(self, make: Callable[[int], Batch], shapes: dict[str, tuple[int, ...]], start: int,
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
        self.expected = self.submitted = start
        self.ready: dict[int, tuple] = {}
        for slot in range(depth):
            self._submit(slot)

    def _submit(self, slot: int) -> None:
        self.tasks.put((self.submitted, slot))
        self.submitted += 1

    def _check_workers(self) -> None:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None:
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                if p.exitcode < 0:
                    try:
                        how = f"{signal.Signals(-p.exitcode).name}"
                    except ValueError:
                        pass
                raise CaffeError(f"data worker {i} (pid {p.pid}) died ({how}) while reading batch {self.expected}; "
                                 "is the machine out of memory?")

    def next(self) -> Batch:
        b = self.expected
        while b not in self.ready:
            try:
                item = self.done.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_workers()
                continue
            self.ready[item[0]] = item
        _, slot, kind, payload = self.ready.pop(b)
        self.expected += 1
        if kind == "error":
            raise CaffeError(payload)
        if kind == "bug":
            raise RuntimeError(f"data worker, batch {b}: {payload}")
        if kind == "slot":
            payload = {t: _copy_out(v, self.pin) for t, v in self.slots[slot].items()}
        self._submit(slot)
        return payload

    def close(self) -> None:
        """Stop the workers (at once: a batch being read is dropped) and free the queues."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
        for q in (self.tasks, self.done):
            q.cancel_join_thread()
            q.close()
        self.procs, self.ready = [], {}
