"""``CaffeNet``: a (filtered, upgraded) NetParameter as an ``nn.Module`` with Caffe's semantics.

Built like Caffe's ``Net::Init``: layers in prototxt order, blobs by name, in-place layers (top ==
bottom) rebinding the name, shapes inferred at build time. A blob read by several layers simply feeds
several autograd consumers, so gradients sum as through Caffe's implicit Split layers.

Learnable blobs follow ``Net::AppendParam``: each distinct blob is one ``nn.Parameter`` in
``learnable`` (Caffe's ``learnable_params_`` order, the order of the solver's history), shared by
``param { name }`` between layers, carrying the owner's (or adopted) lr_mult and decay_mult. A layer
whose ParamSpec has ``lr_mult: 0`` uses a detached view, so it contributes no gradient to the blob
(Caffe's ``param_propagate_down``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from converter import caffe_pb2
from converter.errors import CaffeError, format_shape, layer_error
from converter.fillers import fill
from converter.layers import Layer, layer_class
from converter.layers.base import Shape
from converter.layers.data import DataLayer, MissingShapes

DimCheckMode = caffe_pb2.ParamSpec.DimCheckMode
FLOAT_BYTES = 4  # every blob is float32, as Caffe's Dtype = float


@functools.lru_cache(maxsize=1)
def available_memory() -> int | None:
    """Bytes of memory this process may use: the machine's physical memory, or its cgroup's limit or what its
    address-space limits leave when lower (None when none can be read). A net that needs more cannot run
    here, so it is refused at build time."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(open(limit_file).read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        if limit > 0 and (total is None or limit < total):
            total = limit
    for limit in _rlimit_room():
        if total is None or limit < total:
            total = limit
    return total


def _rlimit_room() -> list[int]:
    """What ``ulimit -v`` (RLIMIT_AS) and ``ulimit -d`` (RLIMIT_DATA) still allow this process to map: the
    limit less what it maps already (VmSize, VmData), read at the first call, before any net is built."""
    import resource

    try:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024
                  for line in open("/proc/self/status") if line.startswith(("VmSize:", "VmData:"))}
    except (OSError, ValueError, IndexError):
        return []
    room = []
    for which, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(which)[0]
        if soft != resource.RLIM_INFINITY and used in status:
            room.append(max(0, soft - status[used]))
    return room


def format_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:,.1f} GiB)"


def check_fits(layer: str, kind: str, what: str, shape: Shape, limit: int | None = None) -> None:
    """One float32 blob of ``shape`` must fit in the memory this process may use (``available_memory``)."""
    limit = available_memory() if limit is None else limit
    size = FLOAT_BYTES * math.prod(shape)
    if limit is not None and size > limit:
        raise layer_error(layer, kind, f"{what} of shape {format_shape(shape)} needs {format_bytes(size)}, more "
                          f"than this machine's memory ({format_bytes(limit)})")


@dataclass
class Learnable:
    """One distinct learnable blob: Caffe's learnable_params_[i] with its multipliers."""

    owner: str  # "<layer>.<index>" of the first layer that declared it
    name: str  # the param { name } or "" when unnamed
    lr_mult: float
    decay_mult: float
    has_lr: bool = False
    has_decay: bool = False
    users: list[str] = field(default_factory=list)


@dataclass
class BlobUse:
    """How one layer sees one of its blobs: which learnable, its own shape, and whether it propagates."""

    learnable: int
    shape: Shape
    propagate: bool


def _with_top(lp: caffe_pb2.LayerParameter, top: str) -> caffe_pb2.LayerParameter:
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(lp)
    copy.top.append(top)
    return copy


class CaffeNet(nn.Module):
    """A Caffe net as a module. ``forward(inputs)`` returns every blob by name; see :meth:`loss`."""

    def __init__(self, net: caffe_pb2.NetParameter, shapes: dict[str, Shape] | None = None,
                 generator: torch.Generator | None = None, allow_missing_shapes: bool = False):
        super().__init__()
        self.proto = net
        self.name = net.name
        self.phase = net.state.phase
        self.layer_params: list[caffe_pb2.LayerParameter] = []
        self.layers = nn.ModuleList()
        self.learnable: list[Learnable] = []
        self.params = nn.ParameterList()
        self.blob_uses: list[list[BlobUse]] = []
        self.loss_weights: list[list[float]] = []
        self.data_layers: list[DataLayer] = []
        self.blob_shapes: dict[str, Shape] = {}
        self.missing_shapes: list[MissingShapes] = []
        self.param_bytes = 0  # float32 bytes of the distinct learnable blobs (what a solver multiplies)
        self.top_bytes = 0  # float32 bytes of every top: one forward pass's activations
        self._build(net, shapes or {}, generator, allow_missing_shapes)

    # ------------------------------------------------------------------------------------------
    # Building
    # ------------------------------------------------------------------------------------------
    def _build(self, net, given, generator, allow_missing):
        names: set[str] = set()
        consumed: set[str] = set()
        unknown: set[str] = set()  # blobs downstream of a data layer with missing shapes
        param_index: dict[str, int] = {}
        anonymous: set[str] = set()
        for lp in net.layer:
            if lp.name in names:
                raise layer_error(lp.name, lp.type, "a layer with this name already exists")
            names.add(lp.name)
            cls = layer_class(lp)
            if not lp.top and cls.is_loss:
                # Caffe's AutoTopBlobs: a loss layer without a top gets an anonymous one, which counts in the
                # loss but is no net output and no other layer's input (Net::Init's "(automatic)" tops).
                lp = _with_top(lp, f"(automatic) {lp.name}")
                anonymous.add(lp.top[0])
            for b in lp.bottom:
                if b not in self.blob_shapes and b not in unknown:
                    raise layer_error(lp.name, lp.type, f"unknown bottom blob '{b}' (no earlier layer "
                                      "produces it)")
            for t in lp.top:
                if (t in self.blob_shapes or t in unknown) and t not in lp.bottom:
                    raise layer_error(lp.name, lp.type, f"top blob '{t}' is produced by multiple layers")
            consumed.update(lp.bottom)
            if any(b in unknown for b in lp.bottom):
                cls.check_counts(lp)
                unknown.update(lp.top)
                continue
            bottom_shapes = [self.blob_shapes[b] for b in lp.bottom]
            try:
                if cls.is_data:
                    layer = cls(lp, bottom_shapes, self.phase, given)
                else:
                    layer = cls(lp, bottom_shapes, self.phase)
            except MissingShapes as e:
                if not allow_missing:
                    raise
                self.missing_shapes.append(e)
                unknown.update(lp.top)
                continue
            if len(layer.top_shapes) != len(lp.top):
                raise layer_error(lp.name, lp.type, f"produces {len(layer.top_shapes)} tops, "
                                  f"{len(lp.top)} named")
            for t, s in zip(lp.top, layer.top_shapes, strict=True):
                self.blob_shapes[t] = tuple(s)
            self._check_memory(lp, layer, param_index)
            if isinstance(layer, DataLayer):
                self.data_layers.append(layer)
            self.layer_params.append(lp)
            self.layers.append(layer)
            self.blob_uses.append(self._append_params(lp, layer, param_index, generator))
            self.loss_weights.append(self._loss_weights(lp, layer))
        self.outputs = [b for b in self.blob_shapes if b not in consumed and b not in anonymous]
        # What forward and loss walk on every call, resolved once (protobuf fields are slow to iterate).
        self._steps = [(i, layer, tuple(lp.bottom), tuple(lp.top))
                       for i, (lp, layer) in enumerate(zip(self.layer_params, self.layers, strict=True))
                       if not isinstance(layer, DataLayer)]
        self._loss_terms = self.loss_blobs()

    def _check_memory(self, lp, layer: Layer, param_index: dict[str, int]) -> None:
        """Refuse, before the fillers allocate anything, a layer whose blobs cannot fit in this machine's memory.

        Counts the layer's new learnable blobs (shared ones are already counted) and its tops, and the running
        total of the net so far (parameters plus one float32 copy of every top: a lower bound of what a forward
        pass holds). Caffe would die in ``cudaMalloc``/``malloc`` at the first Forward; PyTorch would abort with
        an allocator error halfway through the fillers.
        """
        limit = available_memory()
        params = [(f"learnable blob {i}", tuple(spec.shape)) for i, spec in enumerate(layer.blob_specs())
                  if not (i < len(lp.param) and lp.param[i].name and lp.param[i].name in param_index)]
        tops = [(f"top '{t}'", tuple(s)) for t, s in zip(lp.top, layer.top_shapes, strict=True)]
        for what, shape in params + tops:
            check_fits(lp.name, lp.type, what, shape, limit)
        self.param_bytes += sum(FLOAT_BYTES * math.prod(shape) for _, shape in params)
        self.top_bytes += sum(FLOAT_BYTES * math.prod(shape) for _, shape in tops)
        total = self.param_bytes + self.top_bytes
        if limit is not None and total > limit:
            raise layer_error(lp.name, lp.type, f"the net needs at least {format_bytes(total)} for its "
                              f"parameters and blobs up to this layer, more than this machine's memory "
                              f"({format_bytes(limit)})")

    def _append_params(self, lp, layer: Layer, param_index: dict[str, int], generator) -> list[BlobUse]:
        specs = layer.blob_specs()
        if len(lp.param) > len(specs):
            raise layer_error(lp.name, lp.type, f"{len(lp.param)} param specs given for "
                              f"{len(specs)} learnable blobs")
        uses = []
        for i, spec in enumerate(specs):
            ps = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
            statistic = getattr(layer, "fixed_blobs", False)
            if statistic and ps.HasField("lr_mult") and ps.lr_mult != 0:
                raise layer_error(lp.name, lp.type, f"blob {i} holds statistics, it cannot have a "
                                  f"non-zero lr_mult ({ps.lr_mult})")
            lr = 0.0 if statistic else ps.lr_mult
            where = f"{lp.name}.{i}"
            if not ps.name or ps.name not in param_index:
                index = len(self.learnable)
                if ps.name:
                    param_index[ps.name] = index
                self.learnable.append(Learnable(where, ps.name, lr, ps.decay_mult,
                                                statistic or ps.HasField("lr_mult"), ps.HasField("decay_mult"),
                                                [where]))
                what = f"layer '{lp.name}' ({lp.type}) learnable blob {i}"
                value = torch.from_numpy(np.array(spec.values, np.float32)) if spec.values is not None else \
                    fill(spec.filler, spec.shape, what, generator)
                self.params.append(nn.Parameter(value, requires_grad=False))
            else:
                index = param_index[ps.name]
                owned = self.learnable[index]
                have = tuple(self.params[index].shape)
                if ps.share_mode == DimCheckMode.Value("PERMISSIVE"):
                    if math.prod(have) != math.prod(spec.shape):
                        raise layer_error(lp.name, lp.type, f"shared param '{ps.name}' has count "
                                          f"{math.prod(spec.shape)} here but {math.prod(have)} in its owner "
                                          f"{owned.owner} (PERMISSIVE needs equal counts)")
                elif have != tuple(spec.shape):
                    raise layer_error(lp.name, lp.type, f"shared param '{ps.name}' has shape {spec.shape} "
                                      f"here but {have} in its owner {owned.owner} (STRICT sharing)")
                for attr, has_attr in (("lr_mult", "has_lr"), ("decay_mult", "has_decay")):
                    if not ps.HasField(attr):
                        continue
                    value = getattr(ps, attr)
                    if getattr(owned, has_attr) and getattr(owned, attr) != value:
                        raise layer_error(lp.name, lp.type, f"shared param '{ps.name}' has {attr} {value} "
                                          f"but {getattr(owned, attr)} in {owned.owner}")
                    setattr(owned, attr, value)
                    setattr(owned, has_attr, True)
                owned.users.append(where)
            propagate = lr != 0
            if propagate:
                self.params[index].requires_grad_(True)
            uses.append(BlobUse(index, tuple(spec.shape), propagate))
        return uses

    @staticmethod
    def _loss_weights(lp, layer: Layer) -> list[float]:
        if len(lp.loss_weight):
            if len(lp.loss_weight) != len(lp.top):
                raise layer_error(lp.name, lp.type, f"loss_weight must be given once per top or not at all "
                                  f"({len(lp.loss_weight)} for {len(lp.top)} tops)")
            return list(lp.loss_weight)
        return [1.0 if (layer.is_loss and j == 0) else 0.0 for j in range(len(lp.top))]

    # ------------------------------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------------------------------
    def _param_tensors(self) -> list[nn.Parameter]:
        """``list(self.params)`` without ParameterList's per-item string-key lookup (µs each, every layer)."""
        return list(self.params._parameters.values())

    def layer_blobs(self, i: int, params: list[nn.Parameter] | None = None) -> list[torch.Tensor]:
        """The tensors layer ``i`` computes with: shared storage, reshaped, detached when lr_mult is 0."""
        if params is None:
            params = self._param_tensors()
        blobs = []
        for use in self.blob_uses[i]:
            p = params[use.learnable]
            t = p if p.shape == use.shape else p.view(use.shape)
            blobs.append(t if use.propagate else t.detach())
        return blobs

    def forward(self, inputs: dict[str, torch.Tensor], versions: dict[str, list[torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor]:
        """Run every non-data layer in order on ``inputs`` (the data layers' tops).

        Returns every blob by name (after in-place layers, its last value). When ``versions`` is a dict,
        every value each blob name takes is appended to it (the first is what Caffe's diff refers to).
        """
        blobs: dict[str, torch.Tensor] = {}
        for layer in self.data_layers:
            for top in layer.tops:
                if top not in inputs:
                    raise CaffeError(f"layer '{layer.name}': no input given for top '{top}'")
                blobs[top] = inputs[top]
                if versions is not None:
                    versions.setdefault(top, []).append(inputs[top])
        params = self._param_tensors()
        for i, layer, bottoms, top_names in self._steps:
            tops = layer([blobs[b] for b in bottoms], self.layer_blobs(i, params))
            for name, value in zip(top_names, tops, strict=True):
                blobs[name] = value
                if versions is not None:
                    versions.setdefault(name, []).append(value)
        return blobs

    def loss(self, blobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Caffe's net loss: Σ over layers and tops of loss_weight · sum(top).

        A scalar top is its own sum and a weight of 1 is no product (both exact), so a loss layer's top
        with the default weight enters the total as it is, without two more autograd nodes.
        """
        total = None
        for name, w in self._loss_terms:
            top = blobs[name]
            term = top.sum() if top.dim() else top
            if w != 1:
                term = w * term
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros(())
        return total

    def loss_blobs(self) -> list[tuple[str, float]]:
        """(blob, loss_weight) for every top with a non-zero weight, in layer order."""
        return [(name, w) for lp, ws in zip(self.layer_params, self.loss_weights, strict=True)
                for name, w in zip(lp.top, ws, strict=True) if w]

    def input_shapes(self) -> dict[str, Shape]:
        return {t: s for layer in self.data_layers for t, s in zip(layer.tops, layer.top_shapes, strict=True)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def layer_by_name(self, name: str) -> int:
        for i, lp in enumerate(self.layer_params):
            if lp.name == name:
                return i
        raise KeyError(name)
