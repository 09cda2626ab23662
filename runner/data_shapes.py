"""Top shapes of data layers, read from their sources (an LMDB's first Datum, an image list …)."""

from __future__ import annotations

from converter import caffe_pb2
from converter.layers.base import Shape


def peek_data_shapes(net: caffe_pb2.NetParameter) -> dict[str, Shape]:
    """Shapes of every data top whose source can be read; others are left to the caller."""
    shapes: dict[str, Shape] = {}
    try:
        from runner.data import data_layer_shapes
    except ImportError:
        return shapes
    for lp in net.layer:
        shapes.update(data_layer_shapes(lp, net.state.phase))
    return shapes
