"""``egomotion check`` and ``egomotion upgrade``: the net as Caffe would build it, without running it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from converter import caffe_pb2
from converter.errors import format_shape
from converter.io import (
    BINARY_SUFFIXES,
    filter_net,
    net_state,
    read_message,
    read_net,
    upgrade_net,
    upgrade_solver,
    write_message,
)
from converter.net import CaffeNet
from runner.solver_nets import solver_nets


def _first_field(path: str) -> str:
    """The first field name of a prototxt (comments skipped), or "" if there is none."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        match = re.match(r"\s*([A-Za-z_]\w*)", line.split("#", 1)[0])
        if match:
            return match.group(1)
    return ""


def load_net_or_solver(path: str) -> caffe_pb2.NetParameter | caffe_pb2.SolverParameter:
    """A text file whose first field belongs to SolverParameter (and not NetParameter) is a solver."""
    first = _first_field(path) if Path(path).suffix.lower() not in BINARY_SUFFIXES else ""
    solver_fields = caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name
    if first in solver_fields and first not in caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name:
        return upgrade_solver(read_message(path, caffe_pb2.SolverParameter()), path)
    return read_net(path)


def describe(net: CaffeNet, proto: caffe_pb2.NetParameter) -> list[str]:
    lines = []
    built = {lp.name for lp in net.layer_params}
    width = max((len(lp.name) for lp in proto.layer), default=4)
    twidth = max((len(lp.type) for lp in proto.layer), default=4)
    for lp in proto.layer:
        flow = f"{', '.join(lp.bottom) or '-'} -> {', '.join(lp.top) or '-'}"
        if lp.name in built:
            shapes = ", ".join(format_shape(net.blob_shapes[t]) for t in lp.top)
        else:
            shapes = "(shape unknown)"
        lines.append(f"  {lp.name:<{width}}  {lp.type:<{twidth}}  {flow}  {shapes}")
    return lines


def check_one(label: str, proto: caffe_pb2.NetParameter, shapes: dict) -> None:
    net = CaffeNet(proto, shapes, allow_missing_shapes=True)
    phase = caffe_pb2.Phase.Name(proto.state.phase)
    stages = f" stages {','.join(proto.state.stage)}" if len(proto.state.stage) else ""
    print(f"{label} '{proto.name}' phase {phase}{stages}: {len(proto.layer)} layers, "
          f"{net.num_parameters():,} parameters in {len(net.params)} learnable blobs")
    for line in describe(net, proto):
        print(line)
    if net.outputs:
        print(f"  outputs: {', '.join(net.outputs)}")
    for missing in net.missing_shapes:
        print(f"  note: {missing}")


def check(args: argparse.Namespace) -> int:
    from runner.data import peek_data_shapes

    given = dict(args.shape)
    loaded = load_net_or_solver(args.file)
    if isinstance(loaded, caffe_pb2.SolverParameter):
        nets = solver_nets(loaded, args.file)
    else:
        state = net_state(args.phase if args.phase else loaded.state.phase, args.level, args.stage)
        if args.phase is None and not args.stage:
            state.MergeFrom(loaded.state)
        nets = [("net", filter_net(loaded, state, args.file), state)]
    for label, proto, _ in nets:
        shapes = {**peek_data_shapes(proto), **given}
        check_one(label, proto, shapes)
    return 0


def upgrade(args: argparse.Namespace) -> int:
    loaded = load_net_or_solver(args.input)
    if isinstance(loaded, caffe_pb2.NetParameter):
        loaded = upgrade_net(loaded, args.input)
    write_message(args.output, loaded, binary=Path(args.output).suffix.lower() == ".caffemodel")
    print(f"wrote {args.output}")
    return 0

