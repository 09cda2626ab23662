"""``caffe.coord_map``: how the spatial coordinates of one NetSpec top map onto another's, and ``crop``, the
Crop layer that aligns them (fully convolutional nets). A map is ``(axis, scale a, shift b)``: output
coordinate ``a·x + b`` of input coordinate ``x``; pointwise layers are ``(None, 1, 0)``. ``axis`` is a
convolution's: the axis before the first spatial one (1 for N×C×H×W), so a Crop's own ``axis`` (its first
cropped axis, 2) is one more.
"""

from __future__ import annotations

import numpy as np

from runner.pycaffe.net_spec import Function, Top, layers

POINTWISE = {"AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN", "Exp", "MVN",
             "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold"}


class UndefinedMapException(Exception):
    """The layer has no coordinate map (an InnerProduct, say)."""


class AxisMismatchException(Exception):
    """Two maps over different first spatial axes."""


def _spatial(fn: Function) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(axis, stride, effective kernel extent, pad) of a Convolution/Deconvolution/Pooling/Im2col."""
    p = fn.params.get("convolution_param", fn.params)
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(fn.params)
    assert not legacy, "cropping does not support legacy _h/_w params"
    kernel = np.array(p["kernel_size"], ndmin=1)
    dilation = np.array(p.get("dilation", 1), ndmin=1)
    return p.get("axis", 1), np.array(p.get("stride", 1), ndmin=1), (kernel - 1) * dilation + 1, \
        np.array(p.get("pad", 0), ndmin=1)


def coord_map(fn: Function) -> tuple:
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = _spatial(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = _spatial(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name in POINTWISE:
        return None, 1, 0
    if fn.type_name == "Crop":
        p = fn.params.get("crop_param", fn.params)
        return p.get("axis", 2) - 1, 1, -np.array(p.get("offset", 0), ndmin=1)
    raise UndefinedMapException


def compose(base: tuple, then: tuple) -> tuple:
    """``then`` after ``base``: the scales multiply, ``then``'s shift is scaled by ``base``'s scale."""
    ax1, a1, b1 = base
    ax2, a2, b2 = then
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(m: tuple) -> tuple:
    ax, a, b = m
    return ax, 1 / a, -b / a


def _bottoms(top: Top) -> tuple:
    """The inputs a map walks through: all of a layer's, but only the cropped one of a Crop."""
    return top.fn.inputs[:1] if top.fn.type_name == "Crop" else top.fn.inputs


def _walk(start: Top, stop: dict | None = None):
    """Maps from ``start`` back to each ancestor; with ``stop``, the first ancestor also in ``stop``."""
    maps = {start: (None, 1, 0)}
    frontier = [start]
    while frontier:
        top = frontier.pop()
        if stop is not None and top in stop:
            return top, maps
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return None, maps


def coord_map_from_to(top_from: Top, top_to: Top) -> tuple:
    """The map from ``top_from``'s coordinates to ``top_to``'s, through their nearest common ancestor."""
    _, from_maps = _walk(top_from)
    common, to_maps = _walk(top_to, from_maps)
    if common is None:
        raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")
    return compose(to_maps[common], inverse(from_maps[common]))


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cropping ``top_from`` to ``top_to``'s extent and alignment."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    assert (a == 1).all(), f"scale mismatch on crop (a = {a})"
    assert (b <= 0).all(), f"cannot crop negative width (b = {b})"
    assert (np.round(b) == b).all(), f"cannot crop noninteger width (b = {b})"
    return layers.Crop(top_from, top_to, crop_param=dict(axis=ax + 1, offset=list(-np.round(b).astype(int))))
