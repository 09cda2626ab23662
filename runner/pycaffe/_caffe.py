"""``caffe.Net``, ``caffe.Blob`` and the module-level switches of pycaffe's ``_caffe`` extension."""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from converter import caffe_pb2
from converter.blob import Blob
from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net
from converter.layers.base import allow_python_layers, python_layers_allowed, supported_types
from converter.net import CaffeNet
from converter.weights import load_weights, save_weights

FED_HERE = ("Input", "MemoryData")  # data layers whose tops the script gives (blobs, set_input_arrays)
TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
_MODE = {"device": "cpu"}


def set_mode_cpu() -> None:
    _MODE["device"] = "cpu"


def set_mode_gpu() -> None:
    if not torch.cuda.is_available():
        raise CaffeError("set_mode_gpu: no CUDA device (Caffe built for CPU refuses it too)")
    _MODE["device"] = f"cuda:{torch.cuda.current_device()}"


def set_device(device_id: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(device_id)


def set_random_seed(seed: int) -> None:
    """Caffe::set_random_seed: the fillers and the Dropout masks of nets built afterwards."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def layer_type_list() -> list[str]:
    return supported_types()


@contextlib.contextmanager
def python_layers():
    """pycaffe runs a net's Python layers: a program that builds nets through ``import caffe`` allows them."""
    before = python_layers_allowed()
    allow_python_layers(True)
    try:
        yield
    finally:
        allow_python_layers(before)


class _Layer:
    """``net.layers[i]``: its type and its learnable blobs."""

    def __init__(self, lp: caffe_pb2.LayerParameter, blobs: list[Blob]):
        self.type = lp.type
        self.blobs = blobs


class Net:
    """``caffe.Net(prototxt, phase)``, ``caffe.Net(prototxt, weights, phase)``, or the keyword forms
    (``weights=``, ``phase=``, and ``level=``, ``stages=`` as pycaffe)."""

    def __init__(self, network_file: str, *args, phase: int | None = None, weights: str | None = None,
                 level: int = 0, stages: list[str] | tuple[str, ...] = ()):
        rest = list(args)
        if rest and isinstance(rest[-1], int) and phase is None:
            phase = rest.pop()
        if rest and weights is None:
            weights = rest.pop(0)
        if rest or phase is None:
            raise CaffeError("Net(network_file, phase) or Net(network_file, weights, phase), phase caffe.TRAIN/TEST")
        proto = filter_net(read_net(network_file), net_state(phase, level, list(stages)), network_file)
        from runner.netsetup import input_shapes

        with python_layers():
            net = CaffeNet(proto, input_shapes(proto, phase))
        self._attach(net, proto, phase)
        if weights:
            self.copy_from(weights)

    @classmethod
    def _wrap(cls, net: CaffeNet, proto: caffe_pb2.NetParameter, phase: int, feeder=None) -> Net:
        self = cls.__new__(cls)
        self._attach(net, proto, phase, feeder)
        return self

    def _attach(self, net: CaffeNet, proto: caffe_pb2.NetParameter, phase: int, feeder=None) -> None:
        self._net, self._proto, self._phase = net, proto, phase
        self._feeder = feeder
        self._graph = None
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        for name, shape in net.blob_shapes.items():
            self.blobs[name] = Blob(np.zeros(shape, np.float32))
        self.params: OrderedDict[str, list[Blob]] = OrderedDict()
        self.layers: list[_Layer] = []
        for p in net.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for lp, uses in zip(net.layer_params, net.blob_uses, strict=True):
            blobs = [Blob(net.params[u.learnable].detach().view(u.shape).numpy(),
                          net.params[u.learnable].grad.view(u.shape).numpy()) for u in uses]
            self.layers.append(_Layer(lp, blobs))
            if blobs:
                self.params[lp.name] = blobs
        self.layer_dict = OrderedDict((lp.name, layer) for lp, layer in zip(net.layer_params, self.layers,
                                                                             strict=True))
        if self._feeder is None and any(layer.type not in FED_HERE for layer in net.data_layers):
            from runner.data import NetFeeder

            sourced = caffe_pb2.NetParameter()
            sourced.CopyFrom(proto)
            del sourced.layer[:]
            sourced.layer.extend(lp for lp in proto.layer if lp.type != "MemoryData")
            self._feeder = NetFeeder(sourced, phase)
        self._link()

    def _link(self) -> None:
        """Constant DummyData tops (labels a script sets) are the feeder's own tensors: a write into the blob
        is what every later batch holds, as Caffe's DummyData never refills them."""
        if self._feeder is not None:
            for name, value in self._feeder.constant_tops().items():
                self.blobs[name].data = value.numpy()

    # -- names -----------------------------------------------------------------------------------------
    @property
    def _layer_names(self) -> list[str]:
        return [lp.name for lp in self._net.layer_params]

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((lp.name, list(lp.top)) for lp in self._net.layer_params)

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((lp.name, list(lp.bottom)) for lp in self._net.layer_params)

    @property
    def inputs(self) -> list[str]:
        return [t for layer in self._net.data_layers if layer.type == "Input" for t in layer.tops]

    @property
    def outputs(self) -> list[str]:
        from runner.netsetup import output_order

        return output_order(self._net)

    # -- passes ----------------------------------------------------------------------------------------
    def _inputs(self) -> dict[str, torch.Tensor]:
        """The data layers' tops: Input blobs from their ``data`` arrays, Data layers from their sources."""
        feeds = {}
        for layer in self._net.data_layers:
            if layer.type == "MemoryData":
                if getattr(self, "_memory", None) is None:
                    raise CaffeError(f"layer '{layer.name}' (MemoryData): call set_input_arrays first")
                data, labels = self._memory
                take = (self._memory_pos + np.arange(layer.top_shapes[0][0])) % len(data)
                self._memory_pos += len(take)
                self.blobs[layer.tops[0]].data, self.blobs[layer.tops[1]].data = data[take], labels[take]
        if self._feeder is not None:
            constant = self._feeder.constant_tops()
            for name, value in self._feeder.next().items():
                if name not in constant:  # constant DummyData tops are the blobs themselves (see _link)
                    self.blobs[name].data = value.numpy().copy()
        for layer in self._net.data_layers:
            for top in layer.tops:
                feeds[top] = torch.from_numpy(np.ascontiguousarray(self.blobs[top].data, np.float32)).clone()
        return feeds

    def forward(self, blobs: list[str] | None = None, start: str | None = None, end: str | None = None,
                **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """``Net.forward``: set the given input blobs, run the net (or the layers ``start`` … ``end``, their
        bottoms taken from the blobs as they are), return the outputs (the ``end`` layer's tops) and ``blobs``."""
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise CaffeError(f"forward: '{name}' is not a blob of the net")
            self.blobs[name].data[...] = value
        names = self._layer_names
        lo = names.index(start) if start is not None else 0
        hi = names.index(end) if end is not None else len(names) - 1
        if lo == 0 and hi == len(names) - 1:
            from runner.forward import run_graph

            built = self._net.input_shapes()
            if any(self.blobs[top].data.shape != built[top] for top in built if top in self.inputs):
                self.reshape()  # an input blob was reshaped: every layer follows, as Net::Forward's Reshape
            self._graph = run_graph(self._net, self._inputs())
            values = self._graph.blobs
        else:
            with torch.no_grad():
                values, _ = self._run_layers(lo, hi, grad=False)
            self._graph = None
        for name, value in values.items():
            self._set(name, value.detach().numpy())
        outputs = list(dict.fromkeys([*(self.top_names[end] if end is not None else self.outputs), *(blobs or [])]))
        return {name: self.blobs[name].data for name in outputs}

    def _run_layers(self, lo: int, hi: int, grad: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Layers ``lo`` … ``hi`` (Caffe's layer ids) on the blobs' current data: (every value, the leaves)."""
        params = self._net._param_tensors()
        values: dict[str, torch.Tensor] = {}
        leaves: dict[str, torch.Tensor] = {}
        for i, layer, bottoms, tops in self._net._steps:
            if not lo <= i <= hi:
                continue
            ins = []
            for b in bottoms:
                if b not in values:
                    data = torch.from_numpy(np.array(self.blobs[b].data, np.float32))
                    leaves[b] = values[b] = data.requires_grad_(grad)
                ins.append(values[b])
            for name, value in zip(tops, layer(ins, self._net.layer_blobs(i, params)), strict=True):
                values[name] = value
        return values, leaves

    def _set(self, name: str, value: np.ndarray) -> None:
        blob = self.blobs[name]
        if blob.data.shape != value.shape:
            blob.data = np.empty(value.shape, np.float32)
            blob.diff = np.zeros(value.shape, np.float32)
        np.copyto(blob.data, value)

    def backward(self, diffs: list[str] | None = None, start: str | None = None, end: str | None = None,
                 **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """``Net.backward``: the loss layers' gradients plus the ``diff`` of each output blob (or the given
        ones), into every blob's and parameter's ``diff``; returns the input blobs' diffs (and ``diffs``). With
        ``start``/``end`` only those layers run backward, from the ``start`` layer's top diffs as they are."""
        for name, value in kwargs.items():
            self.blobs[name].diff[...] = value
        names = self._layer_names
        hi = names.index(start) if start is not None else len(names) - 1
        lo = names.index(end) if end is not None else 0
        if lo == 0 and hi == len(names) - 1:
            if self._graph is None:  # Caffe backpropagates whatever is in memory: build the pass it needs
                from runner.forward import run_graph

                self._graph = run_graph(self._net, self._inputs())
            tops = {name: torch.from_numpy(np.ascontiguousarray(self.blobs[name].diff, np.float32))
                    for name in self.outputs if name not in dict(self._net.loss_blobs())}
            blob_diffs = self._graph.backward(tops)
            self._graph = None
        else:
            values, leaves = self._run_layers(lo, hi, grad=True)
            weights = dict(self._net.loss_blobs())  # a loss top's diff is its loss weight, as Caffe sets it
            roots, grads = [], []
            for t in self.top_names[names[hi]]:
                if t in values and values[t].requires_grad:
                    roots.append(values[t])
                    grads.append(torch.full_like(values[t], weights[t]) if t in weights else
                                 torch.from_numpy(np.ascontiguousarray(self.blobs[t].diff, np.float32)))
            if roots:
                torch.autograd.backward(roots, grads)
            blob_diffs = {b: (t.grad if t.grad is not None else torch.zeros_like(t)).numpy() for b, t in leaves.items()}
        for name, diff in blob_diffs.items():
            if self.blobs[name].diff.shape != diff.shape:
                self.blobs[name].diff = np.zeros(diff.shape, np.float32)
            np.copyto(self.blobs[name].diff, diff)
        outputs = list(dict.fromkeys([*(self.bottom_names[end] if end is not None else self.inputs), *(diffs or [])]))
        return {name: self.blobs[name].diff for name in outputs}

    def clear_param_diffs(self) -> None:
        """``Net::ClearParamDiffs``: every parameter's diff to zero, in place."""
        for p in self._net.params:
            if p.grad is not None:
                p.grad.zero_()

    def forward_all(self, blobs: list[str] | None = None, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """Forward every item of the given inputs in batches of the net's size; outputs concatenated."""
        names = [*self.outputs, *(blobs or [])]
        if not kwargs:
            return self.forward(blobs)
        count = len(next(iter(kwargs.values())))
        batch = self.blobs[next(iter(kwargs))].data.shape[0]
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(0, count, batch):
            chunk = {k: v[i:i + batch] for k, v in kwargs.items()}
            pad = batch - len(next(iter(chunk.values())))
            if pad:
                chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
            result = self.forward(blobs, **chunk)
            for n in names:
                out[n].append(result[n][:batch - pad].copy())
        return {n: np.concatenate(v) for n, v in out.items()}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        forward = self.forward_all(blobs, **{k: v for k, v in kwargs.items() if k in self.inputs})
        backward = self.backward(diffs)
        return forward, backward

    def reshape(self) -> None:
        """Rebuild the module for the input blobs' current shapes (weights kept)."""
        shapes = {name: self.blobs[name].data.shape for layer in self._net.data_layers for name in layer.tops}
        old = self._net
        with python_layers():
            net = CaffeNet(self._proto, shapes)
        with torch.no_grad():
            for p, q in zip(net.params, old.params, strict=True):
                p.copy_(q)
        data = {name: self.blobs[name].data for name in shapes}
        self._attach(net, self._proto, self._phase, self._feeder)
        for name, value in data.items():
            self.blobs[name].data = value
        self._link()

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """``MemoryDataLayer::Reset``: the first layer (a MemoryData) reads ``data`` (N×C×H×W) and ``labels``
        (N) from here, ``batch_size`` items per forward, wrapping around (N a multiple of the batch)."""
        layer = self._net.data_layers[0] if self._net.data_layers else None
        if layer is None or layer.type != "MemoryData":
            raise CaffeError("set_input_arrays may only be called if the first layer is a MemoryData layer")
        batch = layer.top_shapes[0][0]
        data, labels = np.asarray(data), np.asarray(labels)
        if data.ndim != 4 or labels.shape[0] != data.shape[0] or data.shape[0] % batch:
            raise CaffeError(f"set_input_arrays: data must be N×C×H×W with N labels and N a multiple of the batch "
                             f"size {batch}; got data {data.shape}, labels {labels.shape}")
        self._memory = (np.ascontiguousarray(data, np.float32), np.ascontiguousarray(labels, np.float32).ravel())
        self._memory_pos = 0

    def copy_from(self, weights: str) -> None:
        """``CopyTrainedLayersFrom``: same-named layers take the file's blobs, in place."""
        load_weights(self._net, weights)

    def share_with(self, other: Net) -> None:
        """``ShareTrainedLayersWith``: same-named layers use ``other``'s parameter tensors."""
        from runner.netsetup import share_trained_layers

        share_trained_layers(self._net, other._net)
        self._attach(self._net, self._proto, self._phase, self._feeder)

    def save_hdf5(self, filename: str) -> None:
        """``Net::ToHDF5``: group ``data`` holds one group per layer with a parameter, its blobs as datasets
        ``"0"``, ``"1"``, … in Caffe's shapes (``diff`` likewise, for the gradients)."""
        import h5py

        with h5py.File(filename, "w") as f:
            for kind in ("data", "diff"):
                group = f.create_group(kind)
                for layer, blobs in self.params.items():
                    sub = group.create_group(layer)
                    for i, blob in enumerate(blobs):
                        sub.create_dataset(str(i), data=getattr(blob, kind))

    def load_hdf5(self, filename: str) -> None:
        """``CopyTrainedLayersFromHDF5``: same-named layers take the file's ``data`` blobs, shapes checked."""
        import h5py

        with h5py.File(filename, "r") as f:
            for layer, group in f["data"].items():
                if layer not in self.params:
                    continue
                blobs = self.params[layer]
                if len(group) != len(blobs):
                    raise CaffeError(f"{filename}: layer '{layer}' has {len(group)} blobs, the net {len(blobs)}")
                for i, blob in enumerate(blobs):
                    value = group[str(i)][()]
                    if value.shape != blob.data.shape:
                        raise CaffeError(f"{filename}: layer '{layer}' blob {i} has shape {value.shape}, the net "
                                         f"{blob.data.shape}")
                    blob.data[...] = value

    def save(self, filename: str) -> None:
        """A .caffemodel (BVLC Caffe reads it)."""
        save_weights(self._net, Path(filename))
