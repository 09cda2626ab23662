"""Caffe's deploy conversion, done for the user: the TEST-phase net without its losses, ``Accuracy`` and
``Silence``, cut to the layers the chosen outputs need, each data layer replaced by inputs of its needed
tops (so a train_val prototxt deploys like its hand-written deploy twin). ``egomotion export`` traces the
result to ONNX (runner/export.py); the probes export their towers through it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net
from converter.layers import layer_class
from converter.layers.base import Shape
from converter.net import CaffeNet, check_fits
from converter.weights import copy_trained_layers

log = logging.getLogger(__name__)


DROPPED_TYPES = {"Accuracy", "Silence"}
"""Non-loss layers that only make sense with labels or as sinks; removed like the losses."""


TARGET_BOTTOMS = {
    "SoftmaxWithLoss": {1}, "Accuracy": {1}, "MultinomialLogisticLoss": {1}, "InfogainLoss": {1, 2},
    "HingeLoss": {1}, "SigmoidCrossEntropyLoss": {1}, "EuclideanLoss": {1}, "ContrastiveLoss": {2},
}
"""Bottoms of the dropped layers that are targets (labels, similarity flags), not predictions."""


@dataclass
class DeployNet:
    """The exported part of a net: its proto (data layers replaced by ``Input``), inputs and outputs."""

    proto: caffe_pb2.NetParameter
    inputs: list[str]
    outputs: list[str]
    input_shapes: dict[str, Shape]
    transform: caffe_pb2.TransformationParameter | None = None
    dropped: list[str] = field(default_factory=list)


def is_dropped(lp: caffe_pb2.LayerParameter) -> bool:
    """Loss layers, Accuracy and Silence are not part of a deploy net."""
    return layer_class(lp).is_loss or lp.type in DROPPED_TYPES


def deploy_net(net: caffe_pb2.NetParameter, outputs: list[str] | None = None,
               shapes: dict[str, Shape] | None = None, any_shape: Shape | None = None) -> DeployNet:
    """The deploy form of an already phase-filtered net (see the module docstring).

    ``shapes`` gives a data top's shape by name; ``any_shape`` gives the shape of every graph input
    that ``shapes`` does not name (it overrides shapes the layers declare, as ``--input-shape`` does).
    """
    shapes = dict(shapes or {})
    kept = [lp for lp in net.layer if not is_dropped(lp)]
    dropped = [lp for lp in net.layer if is_dropped(lp)]
    data = [lp for lp in kept if layer_class(lp).is_data]
    data_tops = [t for lp in data for t in lp.top]
    for lp in data:  # an input no machine can hold is named before anything else is said about the net
        for top, shape in _declared_shapes(lp, layer_class(lp)).items():
            check_fits(lp.name, lp.type, f"top '{top}'", shapes.get(top) or any_shape or shape)

    produced: list[str] = []
    consumed: set[str] = set()
    for lp in kept:
        consumed.update(lp.bottom)
        produced.extend(t for t in lp.top if t not in produced)
    targets = {lp.bottom[i] for lp in dropped for i in TARGET_BOTTOMS.get(lp.type, ()) if i < len(lp.bottom)}
    predictions = {b for lp in dropped for i, b in enumerate(lp.bottom)
                   if i not in TARGET_BOTTOMS.get(lp.type, ())}

    if outputs:
        for name in outputs:
            if name in data_tops:
                raise CaffeError(f"output '{name}' is an input of the net (a data layer's top)")
            if name not in produced:
                raise CaffeError(f"output '{name}' is not a blob of the TEST-phase net without its losses "
                                 f"(blobs: {', '.join(b for b in produced if b not in data_tops)})")
        if len(set(outputs)) != len(outputs):
            raise CaffeError(f"outputs named twice: {', '.join(outputs)}")
        chosen = list(outputs)
    else:
        chosen = [b for b in produced if b not in data_tops and b not in consumed
                  and (b not in targets or b in predictions)]
        if not chosen:
            raise CaffeError("the net has no outputs once its loss and accuracy layers are removed; "
                             "name the blobs to export with --outputs")

    # Keep only what the outputs need: walk back from them (an in-place layer keeps its producer).
    needed = set(chosen)
    keep: list[caffe_pb2.LayerParameter] = []
    for lp in reversed(kept):
        if any(t in needed for t in lp.top):
            keep.append(lp)
            needed.update(lp.bottom)
    keep.reverse()

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    del out.input[:], out.input_shape[:], out.input_dim[:]
    inputs: list[str] = []
    input_shapes: dict[str, Shape] = {}
    transform = None
    for lp in keep:
        cls = layer_class(lp)
        if not cls.is_data:
            out.layer.add().CopyFrom(lp)
            continue
        tops = [t for t in lp.top if t in needed]
        declared = _declared_shapes(lp, cls)
        layer = out.layer.add(name=lp.name, type="Input")
        for t in tops:
            shape = shapes.get(t) or any_shape or declared.get(t)
            if shape is None:
                raise CaffeError(f"layer '{lp.name}' ({lp.type}): the shape of '{t}' is unknown without its "
                                 f"data; give it with --input-shape N,C,H,W (or {t}=N,C,H,W)")
            layer.top.append(t)
            layer.input_param.shape.add(dim=list(shape))
            inputs.append(t)
            input_shapes[t] = tuple(int(d) for d in shape)
        if transform is None and lp.HasField("transform_param"):
            transform = caffe_pb2.TransformationParameter()
            transform.CopyFrom(lp.transform_param)
    for name in chosen:
        if name in inputs:
            raise CaffeError(f"output '{name}' is an input of the net")
    return DeployNet(out, inputs, chosen, input_shapes, transform, [lp.name for lp in dropped])


def _declared_shapes(lp: caffe_pb2.LayerParameter, cls) -> dict[str, Shape]:
    """Shapes a data layer writes in its own parameters (Input, DummyData, MemoryData)."""
    try:
        layer = cls(lp, [], caffe_pb2.TEST, {})
    except CaffeError:
        return {}
    return dict(zip(lp.top, layer.top_shapes, strict=True))


def build_deploy(model: str | Path, weights: list[str | Path] | None = None, outputs: list[str] | None = None,
                 shapes: dict[str, Shape] | None = None, any_shape: Shape | None = None,
                 stages: list[str] | tuple[str, ...] = (), seed: int = 0) -> tuple[CaffeNet, DeployNet]:
    """Read ``model`` (TEST phase), cut it to its deploy form, build the module and load ``weights``.

    Blobs that no weights file sets keep their fillers' values, drawn with ``seed``.
    """
    proto = filter_net(read_net(model), net_state("TEST", 0, stages), model)
    if not shapes and any_shape is None:
        shapes = _peek_shapes(proto)
    plan = deploy_net(proto, outputs, shapes, any_shape)
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(seed))
    for path in weights or []:
        ignored = copy_trained_layers(net, read_net(path), str(path))
        if ignored:
            log.info("%s: %d layers not in the exported net: %s", path, len(ignored), ", ".join(ignored))
    net.eval()
    return net, plan


def _peek_shapes(proto: caffe_pb2.NetParameter) -> dict[str, Shape]:
    """Data-layer shapes read from their sources when the runner can (LMDB first Datum, …)."""
    try:
        from runner.data import peek_data_shapes

        return peek_data_shapes(proto)
    except (ImportError, CaffeError, OSError):
        return {}
