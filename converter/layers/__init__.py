"""Caffe layers grouped by Caffe's own families; importing this package registers them all."""

from converter.layers import common, data, loss, neuron, python, vision  # noqa: F401  (registration)
from converter.layers.base import BlobSpec, Layer, layer_class, register, supported_types

__all__ = ["BlobSpec", "Layer", "layer_class", "register", "supported_types"]
