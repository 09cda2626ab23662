""".caffemodel ⇄ CaffeNet, as Caffe's ``Net::CopyTrainedLayersFrom`` and ``Net::ToProto`` do it."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import (
    array_to_blob,
    blob_shape,
    blob_to_array,
    is_legacy_blob,
    read_binary,
    upgrade_net,
    write_message,
)
from converter.net import CaffeNet

log = logging.getLogger(__name__)


def _legacy_shape_equals(source: tuple[int, ...], target: tuple[int, ...], legacy: bool) -> bool:
    """Blob::ShapeEquals: exact, or for legacy 4-D source blobs the target's last four "legacy" dims."""
    if not legacy:
        return source == target
    if len(target) > 4:
        return False
    return source == (1,) * (4 - len(target)) + tuple(target)


def copy_trained_layers(net: CaffeNet, source: caffe_pb2.NetParameter, what: str = "weights") -> list[str]:
    """Copy blobs by layer name; returns the source layers that were ignored (absent from ``net``)."""
    by_name = {lp.name: i for i, lp in enumerate(net.layer_params)}
    ignored = []
    with torch.no_grad():
        for src in source.layer:
            i = by_name.get(src.name)
            if i is None:
                ignored.append(src.name)
                log.info("Ignoring source layer %s", src.name)
                continue
            uses = net.blob_uses[i]
            if len(src.blobs) != len(uses):
                raise CaffeError(f"{what}: layer '{src.name}' has {len(src.blobs)} blobs in the file but "
                                 f"{len(uses)} in the net")
            for j, (blob, use) in enumerate(zip(src.blobs, uses, strict=True)):
                shape = blob_shape(blob)
                legacy = is_legacy_blob(blob)
                if not _legacy_shape_equals(shape, use.shape, legacy):
                    raise CaffeError(f"{what}: cannot copy param {j} of layer '{src.name}': shape mismatch, "
                                     f"file has {shape}, net has {use.shape} (rename the layer to "
                                     "leave it out)")
                values = blob_to_array(blob, f"{what}: layer '{src.name}' blob {j}")
                if not np.all(np.isfinite(values)):
                    raise CaffeError(f"{what}: layer '{src.name}' blob {j} holds NaN or inf values")
                param = net.params[use.learnable]
                param.copy_(torch.from_numpy(values.reshape(tuple(param.shape))))
    return ignored


def load_weights(net: CaffeNet, path: str | os.PathLike) -> list[str]:
    """``--weights file.caffemodel`` for one file.

    A file without a single layer (an empty file parses as an empty NetParameter) is refused: Caffe would
    silently copy nothing and train or test from the fillers' values.
    """
    source = upgrade_net(read_binary(path, caffe_pb2.NetParameter()), path)  # binary whatever its name, as Caffe
    if not len(source.layer):
        raise CaffeError(f"{path}: holds no layers (empty, or not a .caffemodel)")
    return copy_trained_layers(net, source, str(path))


def net_to_proto(net: CaffeNet, with_diff: bool = False) -> caffe_pb2.NetParameter:
    """Every layer with its full LayerParameter and its blobs (shared ones written under each user)."""
    out = caffe_pb2.NetParameter()
    out.name = net.proto.name
    for i, lp in enumerate(net.layer_params):
        layer = out.layer.add()
        layer.CopyFrom(lp)
        del layer.blobs[:]
        for use in net.blob_uses[i]:
            p = net.params[use.learnable]
            values = p.detach().cpu().reshape(use.shape).numpy()
            blob = array_to_blob(values)
            if with_diff:
                grad = p.grad.detach().cpu().reshape(use.shape).numpy() if p.grad is not None \
                    else np.zeros(use.shape, np.float32)
                blob.diff.extend(grad.ravel().tolist())
            layer.blobs.append(blob)
    return out


def save_weights(net: CaffeNet, path: str | os.PathLike, with_diff: bool = False) -> None:
    write_message(path, net_to_proto(net, with_diff), binary=True)
