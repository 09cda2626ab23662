"""``caffe.draw``: ``draw_net(net_param, rankdir, ext)`` → bytes and ``draw_net_to_file(net_param, filename,
rankdir, phase)``, drawn by runner/draw.py (matplotlib; ``.dot`` for Graphviz)."""

from __future__ import annotations

from pathlib import Path

from converter import caffe_pb2
from converter.io import atomic_write_bytes, filter_net, net_state
from runner.draw import draw_net as _draw


def draw_net(caffe_net: caffe_pb2.NetParameter, rankdir: str = "LR", ext: str = "png", phase: int | None = None
             ) -> bytes:
    net = filter_net(caffe_net, net_state(phase)) if phase is not None else caffe_net
    return _draw(net, rankdir, ext)


def draw_net_to_file(caffe_net: caffe_pb2.NetParameter, filename: str, rankdir: str = "LR",
                     phase: int | None = None) -> None:
    ext = Path(filename).suffix.lstrip(".").lower() or "png"
    atomic_write_bytes(filename, draw_net(caffe_net, rankdir, ext, phase))
