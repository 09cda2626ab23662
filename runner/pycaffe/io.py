"""``caffe.io``: blob and Datum conversions, image loading and the Transformer of pycaffe."""

from __future__ import annotations

import numpy as np

from converter import caffe_pb2
from converter.io import array_to_blob, blob_to_array


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as an array of its shape (legacy 4-d shapes included)."""
    if return_diff:
        diff = caffe_pb2.BlobProto()
        diff.CopyFrom(blob)
        del diff.data[:]
        diff.data.extend(blob.diff)
        return blob_to_array(diff)
    return blob_to_array(blob)


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    blob = array_to_blob(np.asarray(arr, np.float32))
    if diff is not None:
        blob.diff.extend(np.asarray(diff, np.float32).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist: list[np.ndarray]) -> bytes:
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(text: bytes) -> list[np.ndarray]:
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(text)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A 3-d C×H×W array as a Datum: uint8 as raw bytes, any other type as float_data (as pycaffe)."""
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    if len(datum.data):
        return np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
    return np.array(datum.float_data).astype(float).reshape(datum.channels, datum.height, datum.width)
