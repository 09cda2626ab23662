"""The train net and test nets of a solver, as ``Solver::InitTrainNet`` and ``InitTestNets`` pick them."""

from __future__ import annotations

from pathlib import Path

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import filter_net, read_net, upgrade_net

Nets = list[tuple[str, caffe_pb2.NetParameter, caffe_pb2.NetState]]


def resolve_path(name: str, solver_path: str) -> Path:
    """Caffe opens net files relative to the working directory; we also accept the solver's folder."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    beside = Path(solver_path).parent / name
    return beside if beside.exists() else path


def _net_from(solver: caffe_pb2.SolverParameter, path: str, file_field: str, param_field: str,
              index: int | None = None) -> caffe_pb2.NetParameter:
    if index is None:
        if solver.HasField(param_field):
            net = caffe_pb2.NetParameter()
            net.CopyFrom(getattr(solver, param_field))
            return upgrade_net(net, f"{path}: {param_field}")
        return read_net(resolve_path(getattr(solver, file_field), path))
    if param_field:
        net = caffe_pb2.NetParameter()
        net.CopyFrom(getattr(solver, param_field)[index])
        return upgrade_net(net, f"{path}: {param_field}[{index}]")
    return read_net(resolve_path(getattr(solver, file_field)[index], path))


def train_net(solver: caffe_pb2.SolverParameter, path: str) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetState]:
    fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if solver.HasField(f)]
    if not fields:
        raise CaffeError(f"{path}: the solver must name a train net with one of net, net_param, train_net, "
                         "train_net_param")
    if len(fields) > 1:
        raise CaffeError(f"{path}: the solver names its train net more than once ({', '.join(fields)})")
    field = fields[0]
    net = _net_from(solver, path, field.removesuffix("_param"), field.removesuffix("_param") + "_param")
    state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
    state.MergeFrom(net.state)
    state.MergeFrom(solver.train_state)
    return filter_net(net, state, path), state


def test_nets(solver: caffe_pb2.SolverParameter, path: str) -> Nets:
    generic = [f for f in ("net", "net_param") if solver.HasField(f)]
    if len(generic) > 1:
        raise CaffeError(f"{path}: the solver gives both net and net_param")
    specific = len(solver.test_net_param) + len(solver.test_net)
    iters = len(solver.test_iter)
    if generic and iters < specific or not generic and iters != specific:
        raise CaffeError(f"{path}: test_iter must be given once per test net ({iters} test_iter for "
                         f"{specific} test nets{' plus the generic net' if generic else ''})")
    count = iters if generic else specific
    if len(solver.test_state) and len(solver.test_state) != count:
        raise CaffeError(f"{path}: test_state must be given once per test net ({len(solver.test_state)} for "
                         f"{count})")
    if count and solver.test_interval <= 0:
        raise CaffeError(f"{path}: test nets need test_interval > 0")
    sources = [("test_net_param", i) for i in range(len(solver.test_net_param))]
    sources += [("test_net", i) for i in range(len(solver.test_net))]
    sources += [(generic[0], None)] * (count - specific) if generic else []
    nets = []
    for k, (field, index) in enumerate(sources):
        if field == "test_net_param":
            net = _net_from(solver, path, "", "test_net_param", index)
        elif field == "test_net":
            net = _net_from(solver, path, "test_net", "", index)
        else:
            net = _net_from(solver, path, "net", "net_param")
        state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
        state.MergeFrom(net.state)
        if len(solver.test_state):
            state.MergeFrom(solver.test_state[k])
        nets.append((f"test net #{k}", filter_net(net, state, path), state))
    return nets


def solver_nets(solver: caffe_pb2.SolverParameter, path: str) -> Nets:
    net, state = train_net(solver, path)
    return [("train net", net, state)] + test_nets(solver, path)
