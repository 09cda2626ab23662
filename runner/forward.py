"""``egomotion forward``: one forward (and backward) pass with every blob written as ``.npy``.

The dump has the layout of ``../shared/reference/golden`` (``<blob>.npy``, ``diffs/<blob>.npy``,
``param_diffs/<layer>.<i>.npy``, '/' written as '__'), so any golden case can be checked from the
command line. Backward follows ``Net::ForwardBackward``: loss layers seed their own gradient with
their loss_weight; ``--top-diff`` sets the gradient arriving at other output blobs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converter.errors import CaffeError, format_shape
from converter.io import filter_net, net_state, read_net, staged_folder
from converter.net import CaffeNet
from converter.weights import load_weights


def file_name(name: str) -> str:
    return name.replace("/", "__")


def _load_array(name: str, path: str) -> torch.Tensor:
    """A numeric .npy file; never unpickles (``allow_pickle=False``): object arrays are refused."""
    what = f"{path}: cannot read array for blob '{name}'"
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise CaffeError(f"{what} (not a .npy file)")
            f.seek(0)
            _check_npy_header(f, what)
            array = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise CaffeError(f"{what} (no such file)") from None
    except ValueError as e:
        why = "it holds Python objects, which are never unpickled; save a numeric array" if "pickle" in str(e) \
            else str(e)
        raise CaffeError(f"{what} ({why})") from None
    except OSError as e:
        raise CaffeError(f"{what} ({e.strerror or e})") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise CaffeError(f"{what} (dtype {array.dtype} is not numeric)")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise CaffeError(f"{what} (dtype {array.dtype} is complex; blobs are real: save its real part or "
                         f"magnitude)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _check_npy_header(f, what: str) -> None:
    """The shape and dtype a .npy header declares must fit the bytes that follow it: a header claiming
    1e5 x 1e5 x 1e5 is refused before numpy allocates anything."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except (ValueError, SyntaxError, OverflowError) as e:
        raise CaffeError(f"{what} (a bad .npy header: {str(e).splitlines()[0]})") from None
    body = os.fstat(f.fileno()).st_size - f.tell()
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize if dtype.itemsize else 0
    if need > body:
        raise CaffeError(f"{what} (its header declares shape {format_shape(shape)} of "
                         f"{dtype}, {need:,} bytes, but the file holds {body:,} after the header)")
    f.seek(0)


@dataclass
class Pass:
    """One forward pass kept for its backward: every blob, each blob's first value (what Caffe's diff refers
    to), and the loss."""

    net: CaffeNet
    blobs: dict[str, torch.Tensor]
    firsts: dict[str, torch.Tensor]
    loss: torch.Tensor

    def backward(self, top_diffs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``Net::Backward``: loss layers seed their gradient with their loss_weight, ``top_diffs`` arrive at
        the other outputs; parameter gradients land in each parameter's ``.grad`` (zeroed by the forward, in
        place); returns every blob's diff."""
        roots, grads = [], []
        if self.loss.requires_grad:
            roots.append(self.loss)
            grads.append(torch.ones_like(self.loss))
        for name, diff in top_diffs.items():
            top = self.blobs[name]
            if tuple(diff.shape) != tuple(top.shape):
                raise CaffeError(f"top diff {name}: shape {tuple(diff.shape)} != blob shape {tuple(top.shape)}")
            if top.requires_grad:
                roots.append(top)
                grads.append(diff)
        if roots:
            torch.autograd.backward(roots, grads)
        return {name: (t.grad if t.grad is not None else torch.zeros_like(t)).detach().cpu().numpy()
                for name, t in self.firsts.items()}


def run_graph(net: CaffeNet, inputs: dict[str, torch.Tensor]) -> Pass:
    """A forward pass that records what :meth:`Pass.backward` needs; parameter gradients are zeroed in place
    (their tensors stay the ones a caller may hold, as pycaffe's ``diff`` arrays)."""
    inputs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    versions: dict[str, list[torch.Tensor]] = {}
    for p in net.params:
        if p.grad is not None:
            p.grad.zero_()
    blobs = net.forward(inputs, versions)
    loss = net.loss(blobs)
    firsts = {name: vs[0] for name, vs in versions.items()}
    for t in firsts.values():
        if t.requires_grad and not t.is_leaf:
            t.retain_grad()
    return Pass(net, blobs, firsts, loss)


def run_forward(net: CaffeNet, inputs: dict[str, torch.Tensor], backward: bool,
                top_diffs: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, torch.Tensor]:
    """(blobs, blob diffs, param diffs, loss). Diffs refer to each blob's first value, as Caffe's do."""
    for name in top_diffs:
        if name not in net.outputs:
            raise CaffeError(f"--top-diff {name}: not an output blob of the net (outputs: {', '.join(net.outputs)})")
    if not backward:
        with torch.no_grad():
            blobs = net.forward(inputs)
            return blobs, {}, {}, net.loss(blobs)
    graph = run_graph(net, inputs)
    blob_diffs = graph.backward(top_diffs)
    param_diffs: dict[str, np.ndarray] = {}
    for lp, uses in zip(net.layer_params, net.blob_uses, strict=True):
        for j, use in enumerate(uses):
            p = net.params[use.learnable]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            param_diffs[f"{lp.name}.{j}"] = g.detach().reshape(use.shape).cpu().numpy()
    return graph.blobs, blob_diffs, param_diffs, graph.loss.detach()


def _check_declared_shapes(proto, inputs: dict[str, torch.Tensor], files: dict[str, str]) -> None:
    """An array whose shape differs from the one its layer declares (Input, DummyData, MemoryData) is
    refused before the net is built, as Caffe's CLI would (it never reshapes a net to its input): a silent
    reshape hides a wrong file."""
    from converter.layers.base import layer_class
    from converter.layers.data import DataLayer

    classes = [layer_class(lp) for lp in proto.layer]  # an unknown or refused type is named first
    for lp, cls in zip(proto.layer, classes, strict=True):
        if not issubclass(cls, DataLayer) or not any(t in files for t in lp.top):
            continue
        declared = cls.declared_shapes(lp)
        for top, shape in zip(lp.top, declared, strict=False):
            if top in files and tuple(shape) != tuple(inputs[top].shape):
                raise CaffeError(f"{files[top]}: array of shape {format_shape(tuple(inputs[top].shape))}, but "
                                 f"layer '{lp.name}' ({lp.type}) declares blob '{top}' as {format_shape(shape)}; "
                                 f"save an array of that shape or change the layer")


def _dump(out: Path, net: CaffeNet, blobs: dict, blob_diffs: dict, param_diffs: dict, loss: torch.Tensor,
          backward: bool) -> None:
    """Every blob, diff and parameter as .npy files and the loss as text, under ``out``."""
    for sub in [out, out / "params", *([out / "diffs", out / "param_diffs"] if backward else [])]:
        sub.mkdir(parents=True, exist_ok=True)
    for name, value in blobs.items():
        np.save(out / f"{file_name(name)}.npy", value.detach().cpu().numpy())
    for name, value in blob_diffs.items():
        np.save(out / "diffs" / f"{file_name(name)}.npy", value)
    for name, value in param_diffs.items():
        np.save(out / "param_diffs" / f"{file_name(name)}.npy", value)
    for lp, uses in zip(net.layer_params, net.blob_uses, strict=True):  # after the pass: BatchNorm's statistics
        for j, use in enumerate(uses):
            value = net.params[use.learnable].detach().reshape(use.shape).cpu().numpy()
            np.save(out / "params" / f"{file_name(lp.name)}.{j}.npy", value)
    (out / "loss.txt").write_text(f"{float(loss):.9g}\n")


def forward(args: argparse.Namespace) -> int:
    """The ``egomotion forward`` verb: Input blobs from ``--input`` files, Data/ImageData layers' first batch
    from their sources (as Caffe's Net::Forward reads them), one pass, everything dumped."""
    from runner.data import NetFeeder
    from runner.netsetup import input_shapes

    proto = read_net(args.model)
    proto = filter_net(proto, net_state(args.phase, 0, args.stage), args.model)
    phase = proto.state.phase
    inputs = {name: _load_array(name, path) for name, path in args.input}
    _check_declared_shapes(proto, inputs, dict(args.input))
    sourced = [lp for lp in proto.layer if lp.type in ("Data", "ImageData")]
    shapes = {**(input_shapes(proto, phase) if sourced else {}), **{n: tuple(t.shape) for n, t in inputs.items()}}
    net = CaffeNet(proto, shapes)
    unknown = [name for name in inputs if name not in net.input_shapes()]
    if unknown:
        raise CaffeError(f"--input {unknown[0]}: the net has no data blob of that name (data blobs: "
                         f"{', '.join(net.input_shapes()) or 'none'})")
    if sourced:
        with NetFeeder(proto, phase) as feeder:
            for name, value in feeder.next().items():
                inputs.setdefault(name, value)
    missing = [t for t in net.input_shapes() if t not in inputs]
    if missing:
        raise CaffeError(f"{args.model}: no --input given for data blob(s) {', '.join(missing)}")
    if args.weights:
        for path in args.weights.split(","):
            load_weights(net, path)
    top_diffs = {name: _load_array(name, path) for name, path in args.top_diff}
    if args.gpu is not None:
        from runner.logs import Log
        from runner.netsetup import pick_device

        device = pick_device(args.gpu, Log(enabled=False))
        net.to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        top_diffs = {k: v.to(device) for k, v in top_diffs.items()}
    blobs, blob_diffs, param_diffs, loss = run_forward(net, inputs, args.backward, top_diffs)
    with staged_folder(args.dump) as out:
        _dump(out, net, blobs, blob_diffs, param_diffs, loss, args.backward)
    print(f"wrote {len(blobs)} blobs{f', {len(blob_diffs)} diffs' if args.backward else ''} to {args.dump}; "
          f"loss = {float(loss):.6g}")
    return 0
