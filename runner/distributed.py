"""Several devices, with Caffe's multi-GPU meaning: ``batch_size`` is per device, each device reads its
own share of the data (every world_size-th record, as Caffe's ``DataReader`` with ``solver_count``), the
gradients are averaged (Caffe's NCCL all-reduce then ``scal(1/solver_count)``) and one update is applied.

Launched either by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment; gloo on CPU, NCCL on CUDA) or
by ``egomotion train --gpu 0,1`` / ``--gpu all``, which spawns one process per listed device.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from converter.errors import CaffeError


def parse_gpus(gpu: str | None) -> list[int]:
    """``--gpu``: absent → [] (CPU), ``all`` → every CUDA device, ``0,1`` → those ids."""
    if gpu is None or gpu == "":
        return []
    if gpu == "all":
        return list(range(torch.cuda.device_count())) or [0]
    try:
        ids = [int(x) for x in gpu.split(",") if x != ""]
    except ValueError:
        raise CaffeError(f"--gpu must be 'all' or device ids like 0 or 0,1; got '{gpu}'") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise CaffeError(f"--gpu must be 'all' or distinct device ids like 0 or 0,1; got '{gpu}'")
    return ids


def launched() -> bool:
    """True inside a process started by torchrun or by :func:`spawn`."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def wants_spawn(gpu: str | None) -> bool:
    """Several devices asked for on the command line, CUDA present, and not already launched."""
    return not launched() and torch.cuda.is_available() and len(parse_gpus(gpu)) > 1


@contextlib.contextmanager
def process_group(gpu: str | None) -> Iterator[None]:
    """Join the process group when launched (NCCL when this process drives a CUDA device, else gloo)."""
    if not launched() or dist.is_initialized():
        yield
        return
    backend = "nccl" if parse_gpus(gpu) and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the net (rank 0's weights are broadcast at construction)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)


def no_sync(ddp: torch.nn.Module):
    """Accumulate iter_size-1 sub-batches locally; the last backward all-reduces (Caffe reduces once)."""
    return ddp.no_sync()


def mean_tensor(value: torch.Tensor) -> torch.Tensor:
    """The loss averaged over processes, so every rank sees the same value (and stops together on NaN); it
    stays on the device (the all-reduce is queued, not waited for)."""
    t = value.clone()
    dist.all_reduce(t)
    return t / world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local: int, entry: Callable[[list[str]], int], argv: list[str], ids: list[int], port: int) -> None:
    os.environ.update(RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(len(ids)),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = entry(argv)
    if code:
        sys.exit(code)


def spawn(gpu: str, entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """``--gpu 0,1`` / ``--gpu all``: one process per device, each calling ``entry(argv)`` (the command line's
    main, given by the caller: nothing here imports the command line)."""
    import torch.multiprocessing as mp

    ids = parse_gpus(gpu)
    try:
        mp.spawn(_child, args=(entry, list(argv), ids, _free_port()), nprocs=len(ids), join=True)
    except mp.ProcessExitedException as e:
        raise CaffeError(f"a training process exited with code {e.exit_code}") from None
    return 0
