"""Access to BVLC Caffe's own outputs in ``../shared/reference/golden`` (the oracle).

``check_layers_of_case`` replays a layer case one layer at a time: each layer is built from the
case's prototxt, fed Caffe's own bottoms and parameters, and its tops, bottom gradients and parameter
gradients are compared with Caffe's. This tests the layers without the net; the net itself is tested
against the same files end to end in ``test_golden_nets.py``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from converter import caffe_pb2

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GOLDEN = REFERENCE / "golden"

FWD_RTOL, FWD_ATOL = 1e-5, 1e-6
BWD_RTOL, BWD_ATOL = 1e-4, 1e-6
LAYER_CASES = ["conv", "pool", "lrn", "ip", "neurons", "bn", "shape", "loss"]
"""The golden cases of single layers (each replayed whole through the net with ``oracle_runs``)."""


def require_golden() -> Path:
    import pytest  # only the tests skip; benchmarks/gpu_check.py reads the cases without pytest

    if not GOLDEN.is_dir():
        pytest.skip(f"golden reference folder {GOLDEN} is absent")
    return GOLDEN


def oracle_runs(folder: Path) -> list[dict]:
    """The ``oracle_dump`` invocations in a case's CASE.md that loaded weights (the ones whose outputs are
    stored): model, phase, weights, inputs and top diffs (name -> .npy path), and whether it ran backward."""
    runs = []
    for line in (folder / "CASE.md").read_text().splitlines():
        if not line.startswith("oracle_dump") or "--weights" not in line:
            continue
        argv = shlex.split(line)[1:]
        run: dict = {"inputs": {}, "top_diffs": {}, "backward": False}
        i = 0
        while i < len(argv):
            flag = argv[i]
            if flag == "--backward":
                run["backward"] = True
                i += 1
                continue
            value = argv[i + 1]
            if flag == "--input":
                name, path = value.split("=", 1)
                run["inputs"][name] = path
            elif flag == "--top_diff":
                name, path = value.split("=", 1)
                run["top_diffs"][name] = path
            else:
                run[flag.lstrip("-")] = value
            i += 2
        runs.append(run)
    return runs


def file_name(name: str) -> str:
    """Blob and layer names with '/' are stored with '__'."""
    return name.replace("/", "__")


def load(case: str, kind: str, name: str) -> np.ndarray | None:
    """``kind`` is one of blobs, diffs, params, param_diffs, inputs; None when Caffe wrote no file."""
    path = GOLDEN / case / kind / f"{file_name(name)}.npy"
    return np.load(path) if path.exists() else None


def read_net(case: str, prototxt: str = "net.prototxt") -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    text_format.Merge((GOLDEN / case / prototxt).read_text(), net)
    return net


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, what: str, rtol: float,
                 atol: float) -> None:
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != Caffe's {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def check_layers_of_case(case: str, prototxt: str = "net.prototxt", phase: int | None = None,
                         only_types: set[str] | None = None, backward: bool = True) -> list[str]:
    """Replay each (non-Input) layer of a golden case in isolation; returns the layer names checked."""
    from converter.layers import layer_class

    require_golden()
    net = read_net(case, prototxt)
    if phase is None:
        phase = net.state.phase
    consumers: dict[str, int] = {}
    for lp in net.layer:
        for b in lp.bottom:
            consumers[b] = consumers.get(b, 0) + 1
    checked = []
    for lp in net.layer:
        if lp.type == "Input" or (only_types and lp.type not in only_types):
            continue
        bottoms = [torch.tensor(load(case, "blobs", b), dtype=torch.float32, requires_grad=True)
                   for b in lp.bottom]
        cls = layer_class(lp)
        layer = cls(lp, [tuple(b.shape) for b in bottoms], phase)
        specs = layer.blob_specs()
        params = []
        for i, spec in enumerate(specs):
            value = load(case, "params", f"{lp.name}.{i}")
            assert value is not None, f"no Caffe value for {lp.name}.{i}"
            # Caffe's params/ hold values *after* forward (BatchNorm updates its statistics); the
            # weights before forward are in init.caffemodel: prefer those when they exist.
            value = initial_param(case, lp.name, i, prototxt, value)
            params.append(torch.tensor(value.reshape(spec.shape), requires_grad=True))
        tops = layer(bottoms, params)
        assert len(tops) == len(lp.top)
        for name, top in zip(lp.top, tops, strict=True):
            expected = load(case, "blobs", name)
            assert_close(top, expected, f"{case}/{lp.name}: top {name}", FWD_RTOL, FWD_ATOL)
        for i, p in enumerate(params):
            after = load(case, "params", f"{lp.name}.{i}")
            assert_close(p, after.reshape(tuple(p.shape)), f"{case}/{lp.name}: param {i} after forward",
                         FWD_RTOL, FWD_ATOL)
        if not backward:
            checked.append(lp.name)
            continue
        grads = []
        for j, (name, top) in enumerate(zip(lp.top, tops, strict=True)):
            if not top.requires_grad:
                continue
            if cls.is_loss or j < len(lp.loss_weight) and lp.loss_weight[j]:
                weight = lp.loss_weight[j] if j < len(lp.loss_weight) else (1.0 if j == 0 else 0.0)
                grads.append((top, torch.full_like(top, weight)))
            else:
                diff = load(case, "diffs", name)
                if diff is not None:
                    grads.append((top, torch.tensor(diff)))
        if grads:
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
        for name, b in zip(lp.bottom, bottoms, strict=True):
            expected = load(case, "diffs", name)
            if expected is None or consumers[name] > 1 or not np.any(expected) and b.grad is None:
                continue
            got = b.grad if b.grad is not None else torch.zeros_like(b)
            assert_close(got, expected, f"{case}/{lp.name}: diff of bottom {name}", BWD_RTOL, BWD_ATOL)
        for i, p in enumerate(params):
            expected = load(case, "param_diffs", f"{lp.name}.{i}")
            if expected is None:
                continue
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            assert_close(got, expected.reshape(tuple(p.shape)), f"{case}/{lp.name}: param diff {i}",
                         BWD_RTOL, BWD_ATOL)
        checked.append(lp.name)
    return checked


def initial_param(case: str, layer: str, index: int, prototxt: str, fallback: np.ndarray) -> np.ndarray:
    """Param ``index`` of ``layer`` as stored in the case's init caffemodel (before any forward)."""
    stem = Path(prototxt).stem
    for model in (f"init_{stem}.caffemodel", "init.caffemodel"):
        path = GOLDEN / case / model
        if not path.exists():
            continue
        net = caffe_pb2.NetParameter()
        net.ParseFromString(path.read_bytes())
        for lp in list(net.layer) + list(net.layers):
            if lp.name == layer and index < len(lp.blobs):
                return np.asarray(lp.blobs[index].data, dtype=np.float32)
        break
    return fallback
