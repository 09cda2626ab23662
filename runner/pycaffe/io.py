"""``caffe.io``: blob and Datum conversions, image loading and the Transformer of pycaffe."""

from __future__ import annotations

import numpy as np

from converter import caffe_pb2
from converter.io import array_to_blob
from data_prep.datum import array_to_datum as _array_to_datum
from data_prep.datum import datum_to_array as _datum_to_array


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) in its shape: the legacy num/channels/height/width when any is set, else
    ``shape`` (no shape and several values is a ValueError; one value and no shape is a scalar)."""
    values = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


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
    """A C×H×W array as a raw Datum (data_prep.datum's rule: uint8 as bytes, any other type as float_data);
    without a label the field stays unset, as pycaffe's."""
    arr = np.asarray(arr)
    datum = _array_to_datum(arr if arr.dtype == np.uint8 else arr.astype(np.float32), label or 0)
    if label is None:
        datum.ClearField("label")
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The Datum's C×H×W values (uint8 data, float float_data; encoded images decoded)."""
    return _datum_to_array(datum)


# ----------------------------------------------------------------------------------------------------
# Images (pycaffe's skimage-based helpers, on OpenCV: no other image library is needed)
# ----------------------------------------------------------------------------------------------------
def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image as H×W×K float32 in [0, 1], RGB (K = 3) or grey (K = 1), as pycaffe's ``load_image``."""
    import cv2

    img = cv2.imread(filename, cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{filename}: cannot read the image")
    img = (img.astype(np.float32) / 255.0)
    return img[:, :, ::-1].copy() if color else img[:, :, np.newaxis]


def resize_image(im: np.ndarray, new_dims: tuple[int, int], interp_order: int = 1) -> np.ndarray:
    """H×W×K resized to ``new_dims`` (nearest, bilinear or bicubic for orders 0, 1, 3), float32."""
    import cv2

    interpolation = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR, 3: cv2.INTER_CUBIC}.get(interp_order, cv2.INTER_LINEAR)
    h, w = int(new_dims[0]), int(new_dims[1])
    channels = [cv2.resize(np.ascontiguousarray(im[:, :, c], np.float32), (w, h), interpolation=interpolation)
                for c in range(im.shape[2])]
    return np.stack(channels, axis=2).astype(np.float32)


def oversample(images: list[np.ndarray], crop_dims: tuple[int, int]) -> np.ndarray:
    """The 10 crops of each H×W×K image: 4 corners and the centre, then the same 5 mirrored."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    crops_ix = np.empty((5, 4), dtype=int)
    k = 0
    for i in (0, im_shape[0] - crop_dims[0]):
        for j in (0, im_shape[1] - crop_dims[1]):
            crops_ix[k] = (i, j, i + crop_dims[0], j + crop_dims[1])
            k += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]
    return crops


class Transformer:
    """pycaffe's input preparation for a net's inputs ``{name: (N, C, H, W)}``: resize to the input's H×W,
    transpose (e.g. H×W×K → K×H×W), channel swap (RGB → BGR), raw scale, mean subtraction, input scale — in
    that order; :meth:`deprocess` undoes them."""

    def __init__(self, inputs: dict[str, tuple[int, ...]]):
        self.inputs = inputs
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise Exception(f"{in_} is not one of the net inputs: {self.inputs}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        self._check(in_)
        caffe_in = data.astype(np.float32, copy=False)
        in_dims = tuple(self.inputs[in_][2:])
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in = caffe_in * self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in = caffe_in - self.mean[in_]
        if in_ in self.input_scale:
            caffe_in = caffe_in * self.input_scale[in_]
        return caffe_in.astype(np.float32)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        self._check(in_)
        decaf_in = data.copy().squeeze()
        if in_ in self.input_scale:
            decaf_in = decaf_in / self.input_scale[in_]
        if in_ in self.mean:
            decaf_in = decaf_in + self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in = decaf_in / self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: tuple[int, ...]) -> None:
        self._check(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise Exception("Transpose order needs to have the same number of dimensions as the input.")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: tuple[int, ...]) -> None:
        self._check(in_)
        if len(order) != self.inputs[in_][1]:
            raise Exception("Channel swap needs to have the same number of dimensions as the input channels.")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        self._check(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """A per-channel mean (K values) or a K×H×W mean of the input's shape."""
        self._check(in_)
        mean = np.asarray(mean, np.float32)
        if mean.ndim == 1:
            if len(mean) != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        elif mean.shape != tuple(self.inputs[in_][1:]):
            raise ValueError("Mean shape incompatible with input shape.")
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        self._check(in_)
        self.input_scale[in_] = scale


def image_transformer(shape: tuple[int, ...], in_: str, mean=None, input_scale=None, raw_scale=None,
                      channel_swap=None) -> Transformer:
    """The Transformer Classifier and Detector give their input: H×W×K images transposed to K×H×W, then the
    optional channel swap, raw scale, mean and input scale."""
    t = Transformer({in_: shape})
    t.set_transpose(in_, (2, 0, 1))
    for setter, value in ((t.set_mean, mean), (t.set_input_scale, input_scale), (t.set_raw_scale, raw_scale),
                          (t.set_channel_swap, channel_swap)):
        if value is not None:
            setter(in_, value)
    return t

