"""Data layers: they describe the blobs the runner feeds; they compute nothing inside the module.

Shapes come from the layer's own parameters where Caffe declares them (Input, DummyData, MemoryData)
and otherwise from the caller (``shapes`` by top name), who reads the data source (the runner peeks
at an LMDB's first Datum, ``egomotion check --shape`` gives them by hand). A data layer whose shapes
nobody could give raises :class:`MissingShapes`, so ``check`` can still validate the rest of the graph.
"""

from __future__ import annotations

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.layers.base import Layer, Shape, layer_error, register


class MissingShapes(CaffeError):
    """The data layer's top shapes are not known without reading its source."""

    def __init__(self, layer: str, tops: list[str], source: str):
        self.layer, self.tops = layer, tops
        where = f" (source '{source}')" if source else ""
        super().__init__(f"layer '{layer}': shapes of {', '.join(tops)} unknown without its data{where}; "
                         f"give them with --shape {tops[0]}=N,C,H,W")


class DataLayer(Layer):
    """Base of data layers: no bottoms, tops shaped by ``declared_shapes`` or by the caller."""

    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_data = True

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int,
                 given: dict[str, Shape] | None = None):
        super().__init__(lp, bottom_shapes, phase)
        self.tops = list(lp.top)
        self.param = lp
        given = given or {}
        declared = self.declared_shapes(lp)
        shapes = [given.get(t, declared[i] if i < len(declared) else None) for i, t in enumerate(self.tops)]
        missing = [t for t, s in zip(self.tops, shapes, strict=True) if s is None]
        if missing:
            raise MissingShapes(lp.name, missing, self.source(lp))
        for top, shape in zip(self.tops, shapes, strict=True):
            if any(d <= 0 for d in shape):
                raise self.error(f"top '{top}' has a non-positive dimension in shape {tuple(shape)}")
        self.top_shapes = [tuple(int(d) for d in s) for s in shapes]

    @classmethod
    def declared_shapes(cls, lp: caffe_pb2.LayerParameter) -> list[Shape]:
        """Shapes written in the layer's own parameters (none for layers that read a source); a class method,
        so that callers can read them without building the layer."""
        return []

    def source(self, lp: caffe_pb2.LayerParameter) -> str:
        return ""

    def forward(self, bottoms, blobs):
        raise CaffeError(f"layer '{self.name}' ({self.type}): data layers are fed by the runner")


@register("Input")
class Input(DataLayer):
    """``input_param { shape … }``: one shape for all tops or one per top."""

    @classmethod
    def declared_shapes(cls, lp):
        shapes = [tuple(s.dim) for s in lp.input_param.shape]
        if len(shapes) == 1:
            return shapes * len(lp.top)
        if shapes and len(shapes) != len(lp.top):
            raise layer_error(lp.name, lp.type, f"input_param has {len(shapes)} shapes for {len(lp.top)} tops "
                              "(give one shape, or one per top) (bottom shapes: )")
        return shapes


@register("DummyData")
class DummyData(DataLayer):
    """``dummy_data_param``: 1 or N shapes (or the legacy num/channels/height/width lists)."""

    @classmethod
    def declared_shapes(cls, lp):
        p = lp.dummy_data_param
        shapes = [tuple(s.dim) for s in p.shape]
        if not shapes and len(p.num):
            shapes = [tuple(dims) for dims in zip(p.num, p.channels, p.height, p.width, strict=False)]
        if len(shapes) == 1:
            return shapes * len(lp.top)
        return shapes


@register("MemoryData")
class MemoryData(DataLayer):
    """``memory_data_param``: data (batch, channels, height, width) and labels (batch,)."""

    @classmethod
    def declared_shapes(cls, lp):
        p = lp.memory_data_param
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)]


@register("Data")
class Data(DataLayer):
    def source(self, lp):
        return lp.data_param.source


@register("ImageData")
class ImageData(DataLayer):
    def source(self, lp):
        return lp.image_data_param.source


@register("HDF5Data")
class HDF5Data(DataLayer):
    def source(self, lp):
        return lp.hdf5_data_param.source


@register("WindowData")
class WindowData(DataLayer):
    def source(self, lp):
        return lp.window_data_param.source
