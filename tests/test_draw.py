"""``egomotion draw`` and ``caffe.draw``: a net's picture as PNG/SVG (matplotlib) or Graphviz text."""

from __future__ import annotations

from pathlib import Path

import cv2

from converter.io import read_net
from runner.cli import main

NET = Path(__file__).resolve().parents[1] / "prototxt" / "mnist" / "egomotion_train_val.prototxt"


def test_draw_png_svg_and_dot(tmp_path, capsys):
    assert main(["draw", str(NET), "-o", str(tmp_path / "net.png"), "--phase", "TRAIN"]) == 0
    image = cv2.imread(str(tmp_path / "net.png"))
    assert image is not None and image.shape[1] > image.shape[0] > 100  # left to right: wider than tall
    assert main(["draw", str(NET), "-o", str(tmp_path / "net.svg"), "--rankdir", "TB"]) == 0
    assert "<svg" in (tmp_path / "net.svg").read_text()
    assert main(["draw", str(NET), "-o", str(tmp_path / "net.dot"), "--phase", "TEST"]) == 0
    dot = (tmp_path / "net.dot").read_text()
    assert dot.startswith('digraph "mnist_egomotion" {') and "rankdir=LR;" in dot
    assert '"blob:pairs" -> "layer:slice_pairs";' in dot and '"layer:conv1" -> "blob:conv1";' in dot
    assert '"layer:relu1" -> "blob:conv1"' not in dot  # in place: the top is the bottom, drawn once
    assert 'label="conv1\\\\n(Convolution)\\\\nkernel 11, stride 4, pad 0, 96 out"' in dot
    capsys.readouterr()
    assert main(["draw", str(NET), "-o", str(tmp_path / "net.bmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "egomotion draw: error: cannot draw to '.bmp': use .png, .svg, .pdf or .dot"
    assert not (tmp_path / "net.bmp").exists()


def test_caffe_draw_module(tmp_path):
    import caffe.draw

    net = read_net(NET)
    caffe.draw.draw_net_to_file(net, str(tmp_path / "x.png"), "TB", phase=caffe.TRAIN)
    assert cv2.imread(str(tmp_path / "x.png")) is not None
    assert caffe.draw.draw_net(net, "LR", "dot").startswith(b"digraph")
