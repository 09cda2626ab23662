"""What ``train``, ``test`` and ``time`` share before a net runs: the data layers' shapes, the device,
Caffe's output order, weight sharing between the train and test nets, comma-separated flags."""

from __future__ import annotations

from pathlib import Path

import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.net import CaffeNet
from runner import distributed
from runner.logs import Log


def comma_list(text: str | None) -> list[str]:
    """``a,b`` flags (--weights, --stage) as a list, empty entries dropped."""
    return [item for item in (text or "").split(",") if item]


def output_order(net: CaffeNet) -> list[str]:
    """Caffe's ``net_output_blobs_``: the unconsumed blobs in std::set (byte) order, not layer order."""
    return sorted(net.outputs, key=lambda s: s.encode())


def input_shapes(proto: caffe_pb2.NetParameter, phase: int) -> dict[str, tuple[int, ...]]:
    """Top shapes of the data layers, read from their sources; a source that cannot be read is an error
    naming the layer (Caffe would fail the same way when the layer opens it)."""
    from runner.data import data_layer_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    for lp in proto.layer:
        found = data_layer_shapes(lp, phase)
        if not found and lp.top and lp.type in ("Data", "ImageData"):
            if lp.type == "Data" and lp.data_param.backend != caffe_pb2.DataParameter.LMDB:
                raise CaffeError(f"layer '{lp.name}' (Data): backend LEVELDB is not supported; convert the "
                                 "data to an LMDB (backend: LMDB)")
            source = lp.data_param.source if lp.type == "Data" else lp.image_data_param.source
            kind = "LMDB" if lp.type == "Data" else "image list"
            where = "" if Path(source).is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise CaffeError(f"layer '{lp.name}' ({lp.type}): its {kind} '{source}'{where} does not exist or "
                             "cannot be read")
        shapes.update(found)
    return shapes


def share_trained_layers(target: CaffeNet, source: CaffeNet) -> None:
    """``Net::ShareTrainedLayersWith``: same-named layers of a test net use the train net's tensors."""
    by_name = {lp.name: i for i, lp in enumerate(source.layer_params)}
    for i, lp in enumerate(target.layer_params):
        j = by_name.get(lp.name)
        if j is None:
            continue
        uses, src_uses = target.blob_uses[i], source.blob_uses[j]
        if len(uses) != len(src_uses):
            raise CaffeError(f"test net layer '{lp.name}' has {len(uses)} blobs, the train net's {len(src_uses)}")
        for k, (u, s) in enumerate(zip(uses, src_uses, strict=True)):
            if u.shape != s.shape:
                raise CaffeError(f"cannot share param {k} of layer '{lp.name}' between the train and test nets: "
                                 f"shape {u.shape} vs {s.shape}")
            target.params[u.learnable] = source.params[s.learnable]


def pick_device(gpu: str | None, log: Log) -> torch.device:
    """The verb's device, logged as Caffe does (``Use CPU.`` / ``Use GPU with device ID``) after the thread
    choice; a device that cannot be used is an error before anything is logged."""
    from runner import threads

    device = cuda_device(gpu)
    if threads.describe():
        log.line("threads.py:1", f"Using {threads.describe()}")
    if device.type == "cpu":
        log.line("caffe.cpp:268", "Use CPU.")
    else:
        log.line("caffe.cpp:253", f"Use GPU with device ID {device.index}")
    return device


def cuda_device(gpu: str | None) -> torch.device:
    ids = distributed.parse_gpus(gpu)
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # as a CPU-only Caffe refuses --gpu: never a silent CPU run
        raise CaffeError(f"--gpu {gpu}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'built without CUDA' if torch.version.cuda is None else 'no CUDA device visible'}); "
                         "leave out --gpu to run on the CPU")
    local = distributed.local_rank()
    index = ids[local % len(ids)]
    if index >= torch.cuda.device_count():
        raise CaffeError(f"--gpu {gpu}: device {index} does not exist ({torch.cuda.device_count()} CUDA devices)")
    torch.cuda.set_device(index)
    # Caffe computes in true float32: no TensorFloat-32 in cuDNN convolutions or cuBLAS matmuls
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda", index)


def check_training_memory(net: CaffeNet, test_nets: list[CaffeNet], sp: caffe_pb2.SolverParameter) -> None:
    """Refuse, before the solver allocates its history, a training that cannot fit in this machine's memory.

    Counted (float32): every learnable blob as weight, gradient and the solver's histories (two for Adam and
    AdaDelta, one otherwise; L1 regularisation adds a sign temporary), the train net's activations and their
    gradients, the test nets' activations, and at a snapshot the serialized weights and histories beside the
    live ones, whichever of the pass and the snapshot is larger. A lower bound: the allocator's slack and
    autograd's saved tensors come on top."""
    from converter.net import available_memory, format_bytes
    from runner.solver import TWO_HISTORIES

    limit = available_memory()
    if limit is None:
        return
    histories = 2 if sp.type in TWO_HISTORIES else 1
    copies = 2 + histories + (1 if sp.regularization_type == "L1" else 0)
    params = net.param_bytes
    tests = sum(t.top_bytes for t in test_nets)
    passes = 2 * net.top_bytes
    snapshot = params * (1 + histories)
    need = params * copies + tests + max(passes, snapshot)
    if need > limit:
        raise CaffeError(f"training needs at least {format_bytes(need)}, more than this machine's memory "
                         f"({format_bytes(limit)}): {format_bytes(params)} of parameters x {copies} (weights, "
                         f"gradients, {histories} {sp.type} histor{'ies' if histories > 1 else 'y'}"
                         f"{', the L1 sign' if copies > 2 + histories else ''}), activations and their gradients "
                         f"{format_bytes(passes)}, test nets {format_bytes(tests)}; use a smaller net or batch")
