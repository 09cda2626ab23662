"""``egomotion export``: a Caffe net (deploy or train_val) as an ONNX graph, checked against the module.

What goes into the graph is the TEST-phase net as Caffe's deploy conversion makes it by hand:

* loss layers (every layer class with ``is_loss``), ``Accuracy`` and ``Silence`` are dropped;
* the chosen blobs become the graph outputs (default: the net's outputs once those layers are gone,
  i.e. the predictions they consumed, never their labels);
* only the layers those outputs need are kept; each data layer becomes a graph input per *needed* top
  (named after the top), so a train_val prototxt with ``Data`` layers exports like its deploy twin
  (labels and their ``Slice`` layers fall away with the losses);
* the batch dimension is symbolic (``batch``).

The module's pooling layers pad explicitly and pool in floor mode (``converter/layers/vision.py``), so
Caffe's output sizes do not depend on ONNX's ceil rule (caffe-semantics.md §2.2, the ONNX/onnxruntime
ceil-mode bugs of §3.2); LRN WITHIN_CHANNEL is exported as the composition Caffe itself builds (x²,
AveragePool with zero padding, affine, power, product), since ONNX's ``LRN`` is ACROSS_CHANNELS only.
Layers that reshape to the shapes computed at build time record the trace's batch size as a constant;
:func:`free_batch_dimension` turns those ``Reshape`` targets into ONNX's "copy this dimension" (0)
wherever shape inference shows that the reshaped tensor's first axis *is* the batch.

Every export is verified before it is written: ``onnx.checker`` (full check), then ONNX Runtime on the
CPU for two batch sizes, asserting that every output has Caffe's blob shape (:attr:`CaffeNet.blob_shapes`
with the batch replaced) and equals the PyTorch module within a relative tolerance
(:func:`max_rel_error`). The file is written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf import text_format
from onnx import numpy_helper
from torch import nn

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import atomic_write_bytes
from converter.layers.base import Shape
from converter.net import CaffeNet
from runner.deploy import DeployNet, build_deploy
from runner.netsetup import cuda_device
from runner.ort import max_rel_error, ort_session

log = logging.getLogger(__name__)

BATCH = "batch"
"""The name of the symbolic first axis of every graph input and output."""

DEFAULT_OPSET = 17
"""Opset 17 is understood by every onnxruntime >= 1.13 and by the TorchScript exporter."""

PARITY_RTOL = 1e-5
"""ONNX Runtime vs the module: max |ort - torch| / max |torch| per output (see :func:`max_rel_error`)."""
















class Graph(nn.Module):
    """``CaffeNet`` with positional inputs and a tuple of chosen outputs, as the exporter wants it."""

    def __init__(self, net: CaffeNet, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.net, self.inputs, self.outputs = net, list(inputs), list(outputs)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blobs = self.net(dict(zip(self.inputs, xs, strict=True)))
        return tuple(blobs[name] for name in self.outputs)


def rebatch(net: CaffeNet, plan: DeployNet, batch: int) -> CaffeNet:
    """The same net (sharing its parameters) built for another batch size.

    Several layers reshape to the shapes computed at build time, so the module itself has a fixed
    batch; the ONNX graph does not (:func:`free_batch_dimension`).
    """
    shapes = {n: (batch, *s[1:]) if s else s for n, s in plan.input_shapes.items()}
    if shapes == plan.input_shapes:
        return net
    proto = caffe_pb2.NetParameter()
    proto.CopyFrom(plan.proto)
    for lp in proto.layer:
        if lp.type == "Input":
            for shape, top in zip(lp.input_param.shape, lp.top, strict=True):
                del shape.dim[:]
                shape.dim.extend(shapes[top])
    other = CaffeNet(proto)
    for mine, theirs in zip(other.params, net.params, strict=True):
        mine.data = theirs.data
    return other.eval()


def example_inputs(shapes: dict[str, Shape], batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded uniform [-1, 1) inputs, with the first axis replaced by ``batch`` when given."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        s = (batch, *shape[1:]) if batch is not None and shape else shape
        out[name] = torch.rand(s, generator=g) * 2 - 1
    return out


def _trace(net: CaffeNet, plan: DeployNet, opset: int, batch: int | None, params: bool = True) -> onnx.ModelProto:
    graph = Graph(net, plan.inputs, plan.outputs).eval()
    example = example_inputs(plan.input_shapes, batch)
    dynamic = {name: {0: BATCH} for name in (*plan.inputs, *plan.outputs) if _batched(net, plan, name)}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the verification decides
        try:
            torch.onnx.export(graph, tuple(example[n] for n in plan.inputs), buf, input_names=plan.inputs,
                              output_names=plan.outputs, dynamic_axes=dynamic, opset_version=opset,
                              do_constant_folding=True, export_params=params, dynamo=False)
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:  # unsupported op for this opset
            raise CaffeError(f"cannot export net '{plan.proto.name}' to ONNX opset {opset}: "
                             f"{str(e).splitlines()[0]}") from None
    return onnx.load_from_string(buf.getvalue())


def trace_batch(plan: DeployNet) -> int | None:
    """The batch size the net was built with, or None when the inputs' first axes differ (or are absent).

    Only a net whose inputs all share their first extent has a batch axis to make dynamic; others (a
    layer test net slicing along axis 0, say) are exported with the shapes they declare.
    """
    firsts = {s[0] if s else None for s in plan.input_shapes.values()}
    return firsts.pop() if len(firsts) == 1 else None


def _batched(net: CaffeNet, plan: DeployNet, name: str) -> bool:
    """Whether blob ``name``'s first axis is the (dynamic) batch: inputs, and outputs of the same extent."""
    batch = trace_batch(plan)
    if batch is None:
        return False
    shape = plan.input_shapes[name] if name in plan.input_shapes else net.blob_shapes[name]
    return bool(shape) and shape[0] == batch


def to_onnx(net: CaffeNet, plan: DeployNet, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace the module (TorchScript exporter) with a symbolic batch; the model is not yet checked.

    The module is traced at the net's batch and at one more (:func:`rebatch`), so constants that the
    layers derived from the batch size can be told apart from real ones (:func:`free_batch_dimension`).
    """
    batch = trace_batch(plan)
    with _kept_params(net):
        model = _trace(net, plan, opset, batch)
        if batch is not None:
            other = _trace(rebatch(net, plan, batch + 1), plan, opset, batch + 1, params=False)
            free_batch_dimension(model, other)
    name_output_dims(model, net, plan)
    model.doc_string = f"Caffe net '{plan.proto.name}' exported by egomotion (TEST phase, deploy form)"
    meta = {"caffe.net": plan.proto.name, "caffe.inputs": ",".join(plan.inputs),
            "caffe.outputs": ",".join(plan.outputs),
            "caffe.input_shapes": ";".join(f"{n}={','.join(map(str, plan.input_shapes[n]))}" for n in plan.inputs),
            "caffe.blob_shapes": ";".join(f"{n}={','.join(map(str, net.blob_shapes[n]))}" for n in plan.outputs)}
    if plan.transform is not None:
        meta["caffe.transform_param"] = text_format.MessageToString(plan.transform, as_one_line=True)
    onnx.helper.set_model_props(model, meta)
    return model


def name_output_dims(model: onnx.ModelProto, net: CaffeNet, plan: DeployNet) -> None:
    """Each output's shape as Caffe's blob: the batch axis symbolic (``batch``, shared with the inputs, as it
    is one batch), every other axis its fixed extent, instead of the tracer's generated names."""
    for output in model.graph.output:
        shape = net.blob_shapes[output.name]
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for i, (dim, extent) in enumerate(zip(dims, shape, strict=True)):
            if i == 0 and _batched(net, plan, output.name):
                dim.dim_param = BATCH
            else:
                dim.dim_value = extent


@contextlib.contextmanager
def _kept_params(net: CaffeNet):
    """Restore every parameter afterwards: layers that update statistics in forward (BatchNorm without
    global stats) must not change the weights being exported by being traced or verified."""
    saved = [p.detach().clone() for p in net.params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(net.params, saved, strict=True):
                p.copy_(v)


def free_batch_dimension(model: onnx.ModelProto, other: onnx.ModelProto) -> int:
    """Make ``Reshape`` targets that froze the traced batch size follow the batch instead.

    ``other`` is the same net traced at another batch size. A ``Reshape`` whose constant target differs
    between the two traces only in its first entry gets ``-1`` there (no other entry is -1): the size is
    conserved by Reshape, so -1 yields exactly the batch-dependent extent. Other batch-dependent
    constants are left alone; :func:`verify` then reports the failing output. Returns how many targets
    were changed.
    """
    targets = {n.name: _constant_value(n.input[1], model) for n in model.graph.node if n.op_type == "Reshape"}
    others = {n.name: _constant_value(n.input[1], other) for n in other.graph.node if n.op_type == "Reshape"}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        mine, theirs = targets.get(node.name), others.get(node.name)
        if mine is None or theirs is None or mine.shape != theirs.shape or mine.ndim != 1 or not len(mine):
            continue
        if mine[0] == theirs[0] or np.any(mine[1:] != theirs[1:]) or np.any(mine[1:] == -1):
            continue
        fixed = mine.astype(np.int64).copy()
        fixed[0] = -1
        name = f"{node.name or node.output[0]}__batch_shape"
        model.graph.initializer.append(numpy_helper.from_array(fixed, name))
        node.input[1] = name
        changed += 1
    _drop_unused(model)
    return changed


def _constant_value(name: str, model: onnx.ModelProto) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` node output, else None."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers and ``Constant`` nodes nothing reads any more."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------




def verify(model: onnx.ModelProto | bytes, net: CaffeNet, plan: DeployNet, batches: tuple[int, ...] = (1, 2),
           rtol: float = PARITY_RTOL, seed: int = 0, device: torch.device | None = None) -> dict[str, float]:
    """Run ORT and the module on seeded inputs for each batch size; shapes must be Caffe's. On a CUDA
    ``device`` the module runs there and ORT with its CUDA provider when it has one (else on the CPU).

    Returns the max relative error per output over all batches; raises a CaffeError on a shape
    mismatch or an error above ``rtol``.
    """
    cuda = device is not None and device.type == "cuda"
    session = ort_session(model, ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None,
                          threads=torch.get_num_threads())  # the verb's share of the CPUs
    errors = {name: 0.0 for name in plan.outputs}
    if trace_batch(plan) is None:
        batches = (None,)
    for i, batch in enumerate(batches):
        inputs = example_inputs(plan.input_shapes, batch, seed + i)
        graph = Graph(net if batch is None else rebatch(net, plan, batch), plan.inputs, plan.outputs).eval()
        graph.to(device or "cpu")
        with torch.no_grad(), _kept_params(net):
            try:
                expected = [t.cpu().numpy() for t in graph(*(inputs[n].to(device or "cpu") for n in plan.inputs))]
            except (RuntimeError, CaffeError) as e:
                raise CaffeError(f"net '{plan.proto.name}': the module itself fails at batch {batch} "
                                 f"({str(e).splitlines()[0]})") from None
        try:
            got = session.run(plan.outputs, {n: inputs[n].numpy() for n in plan.inputs})
        except Exception as e:  # onnxruntime raises its own exception types
            raise CaffeError(f"net '{plan.proto.name}': ONNX Runtime fails at batch {batch}: "
                             f"{str(e).splitlines()[0]}") from None
        for name, g, e in zip(plan.outputs, got, expected, strict=True):
            shape = net.blob_shapes[name]
            want = (batch, *shape[1:]) if batch is not None and _batched(net, plan, name) else tuple(shape)
            if tuple(g.shape) != want:
                raise CaffeError(f"net '{plan.proto.name}': ONNX output '{name}' has shape {tuple(g.shape)} at "
                                 f"batch {batch}, Caffe's blob has {want}")
            errors[name] = max(errors[name], max_rel_error(g, e))
    bad = {n: e for n, e in errors.items() if not e <= rtol}
    if bad:
        worst = ", ".join(f"{n} {e:.3g}" for n, e in bad.items())
        raise CaffeError(f"net '{plan.proto.name}': ONNX Runtime differs from the module beyond {rtol:g} "
                         f"relative: {worst}")
    return errors


def export_model(net: CaffeNet, plan: DeployNet, path: str | Path | None = None, opset: int = DEFAULT_OPSET,
                 check: bool = True, batches: tuple[int, ...] = (1, 2), rtol: float = PARITY_RTOL,
                 device: torch.device | None = None) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Export (traced on the CPU), check with onnx.checker, verify against ORT (the module on ``device``), and
    (when ``path``) write atomically."""
    model = to_onnx(net, plan, opset)
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise CaffeError(f"net '{plan.proto.name}': the ONNX model is {len(data) / 2**30:.1f} GiB, over "
                         "protobuf's 2 GiB limit")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CaffeError(f"net '{plan.proto.name}': the exported graph fails onnx.checker: "
                         f"{str(e).splitlines()[0]}") from None
    try:
        errors = verify(data, net, plan, batches, rtol, device=device) if check else {}
    finally:
        net.to("cpu")
    if path is not None:
        atomic_write_bytes(path, data)
    return model, errors


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_input_shapes(texts: list[str]) -> tuple[dict[str, Shape], Shape | None]:
    """``--input-shape`` values: ``N,C,H,W`` (every input) or ``name=N,C,H,W`` (one input)."""
    named: dict[str, Shape] = {}
    anonymous = None
    for text in texts or []:
        name, sep, dims = text.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise CaffeError(f"--input-shape: expected N,C,H,W or name=N,C,H,W with positive sizes, got '{text}'")
        if sep:
            named[name] = shape
        else:
            anonymous = shape
    return named, anonymous


def check_opset(opset: int) -> None:
    """Refuse an opset the (TorchScript) exporter cannot write before tracing (it dumps its IR graph to stderr)."""
    from torch.onnx import _constants

    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 20))
    if not low <= opset <= high:
        raise CaffeError(f"--opset {opset}: the exporter writes opsets {low} to {high}")


def export(args: argparse.Namespace) -> int:
    check_opset(args.opset)
    outputs = [o for o in (args.outputs or "").split(",") if o] or None
    named, anonymous = parse_input_shapes(args.input_shape)
    weights = [w for w in (args.weights or "").split(",") if w]
    net, plan = build_deploy(args.model, weights, outputs, named, anonymous, args.stage)
    device = cuda_device(args.gpu)
    _, errors = export_model(net, plan, args.output, args.opset, check=not args.no_verify, device=device)
    per_item = {n: net.blob_shapes[n][1:] if _batched(net, plan, n) else net.blob_shapes[n] for n in plan.outputs}
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in per_item.items())
    batch = "dynamic batch" if trace_batch(plan) is not None else "fixed shapes (the inputs' first axes differ)"
    print(f"wrote {args.output}: inputs {', '.join(plan.inputs)}; outputs (per item) {shapes}; {batch}")
    if errors:
        where = f" against the module on {device}" if device.type == "cuda" else ""
        print(f"ONNX Runtime parity (batches 1, 2){where}: max relative error {max(errors.values()):.3g}")
    return 0
