"""``caffe.net_spec`` (``from caffe import layers as L, params as P``): nets written as Python calls.

``L.Convolution(bottom, kernel_size=5, num_output=20, param=[dict(lr_mult=1)])`` makes a layer whose keyword
arguments go into its ``convolution_param`` (or into the LayerParameter itself when it has such a field, or
when the name ends in ``param``); ``ntop`` sets the number of tops, ``in_place=True`` writes the top over the
bottom. ``NetSpec`` names tops by attribute assignment (``n.conv1 = L.Convolution(n.data, …)``) and names each
layer after its first top; unnamed tops and top-less layers get ``<Type><count>``. ``P.Pooling.MAX`` is the
enum value of ``PoolingParameter.MAX``.
"""

from __future__ import annotations

from collections import OrderedDict

from converter import caffe_pb2


def param_name_dict() -> dict[str, str]:
    """Layer type → the prefix of its ``<prefix>_param`` field, read from the schema (``Convolution`` →
    ``convolution``); Deconvolution and Im2col take ``convolution_param`` too."""
    layer = caffe_pb2.LayerParameter()
    names = {}
    for field in layer.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    for shares_convolution in ("Deconvolution", "Im2col"):  # Caffe reads their settings from convolution_param
        names.setdefault(shares_convolution, "convolution")
    return names


def assign_proto(proto, name: str, value) -> None:
    """Set ``proto.name`` from a Python value: dicts fill sub-messages, lists fill repeated fields, and a single
    value given for a repeated field is a list of one (pycaffe's rule)."""
    if hasattr(getattr(proto, name), "extend") and not isinstance(value, list | tuple):
        value = [value]
    if isinstance(value, list | tuple):
        if value and isinstance(value[0], dict):
            for item in value:
                entry = getattr(proto, name).add()
                for k, v in item.items():
                    assign_proto(entry, k, v)
        else:
            getattr(proto, name).extend(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            assign_proto(getattr(proto, name), k, v)
    else:
        setattr(proto, name, value)


class Top:
    """One output of a layer function."""

    def __init__(self, fn: Function, n: int):
        self.fn, self.n = fn, n

    def to_proto(self) -> caffe_pb2.NetParameter:
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer: its type, its inputs (Tops) and its keyword parameters."""

    def __init__(self, type_name: str, inputs: tuple, params: dict):
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _get_top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        prefixes = param_name_dict()
        for k, v in self.params.items():
            if k.endswith("param") or k in layer.DESCRIPTOR.fields_by_name:
                assign_proto(layer, k, v)
            else:
                field = prefixes.get(self.type_name)
                if field is None:
                    raise AttributeError(f"layer type '{self.type_name}' has no parameter '{k}'")
                assign_proto(getattr(layer, f"{field}_param"), k, v)
        layers[self] = layer


def _autonames():
    from collections import Counter

    return Counter()


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """A NetParameter of every layer the given tops need, in dependency order."""
    layers: OrderedDict = OrderedDict()
    autonames = _autonames()
    names: dict = {}
    for top in tops:
        top.fn._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops named by assignment: ``n.data, n.label = L.Data(…, ntop=2)``; ``n.to_proto()``."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.__getattr__(item)

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list:
        return list(self.tops.values())

    def to_proto(self) -> caffe_pb2.NetParameter:
        names = {v: k for k, v in self.tops.items()}
        autonames = _autonames()
        layers: OrderedDict = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.<Type>(*bottoms, **params)``: a Top (one top), a tuple of Tops (``ntop`` > 1), or the Function
    (``ntop=0``)."""

    def __getattr__(self, name: str):
        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        return layer_fn


class Parameters:
    """``P.<Type>.<ENUM>``: the enum values of ``<Type>Parameter`` (``P.Pooling.MAX``)."""

    def __getattr__(self, name: str):
        class Param:
            def __getattr__(self, param_name: str):
                return getattr(getattr(caffe_pb2, name + "Parameter"), param_name)

        return Param()


layers = Layers()
params = Parameters()
