"""Caffe's ``Datum`` record ⇄ numpy, as ``src/caffe/util/io.cpp`` writes and reads it.

A Datum holds one image (or any C×H×W array) and an int32 label in one of three forms:

* raw: ``channels, height, width`` and ``data`` = uint8 bytes in C, H, W order (``CVMatToDatum``
  transposes OpenCV's interleaved H, W, C BGR pixels into planes), ``encoded`` explicitly false;
* float: the same header and ``float_data`` (used by Caffe only when ``data`` is empty);
* encoded: ``data`` = the bytes of a PNG/JPEG file, ``encoded`` true, no header — decoded with
  OpenCV (``cv::imdecode``) at read time, natively (``DecodeDatumToCVMatNative``, flag -1) or forced to
  colour / gray (``DecodeDatumToCVMat``, ``transform_param.force_color`` / ``force_gray``).

Arrays here are always C, H, W (uint8 for image data, float32 for ``float_data``), colour in BGR as
OpenCV and Caffe keep it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from google.protobuf.message import DecodeError

from converter import caffe_pb2
from converter.errors import CaffeError, format_shape

#: How an encoded image is decoded: Caffe's three OpenCV flags.
DECODE_FLAGS = {"native": cv2.IMREAD_UNCHANGED, "color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE}


def _where(key: bytes | str | None) -> str:
    if key is None:
        return "record"
    return f"record '{key.decode(errors='replace') if isinstance(key, bytes) else key}'"


def parse_datum(value: bytes, key: bytes | str | None = None) -> caffe_pb2.Datum:
    """A Datum from an LMDB value; a corrupt record is a CaffeError naming its key."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise CaffeError(f"{_where(key)}: not a Datum ({e})") from None
    return datum


def decode_mode(force_color: bool = False, force_gray: bool = False) -> str:
    """``data_transformer.cpp``: both flags together are refused; neither means native decoding."""
    if force_color and force_gray:
        raise CaffeError("transform_param: cannot set both force_color and force_gray")
    return "color" if force_color else "gray" if force_gray else "native"


#: Refuse encoded images larger than this before decoding (OpenCV's own limit is 2**30 pixels).
MAX_IMAGE_PIXELS = 1 << 28
#: No PNG (deflate ≤ 1032:1, 8 pixels per byte at 1 bit), JPEG (≥ 1 bit per 8x8 block), BMP or GIF packs more
#: pixels per file byte: a header that declares more is corrupt or a decompression bomb (a mutated 600-byte
#: JPEG declaring 30000x30000 makes OpenCV allocate 2.7 GB and spend 40 s "decoding" it).
MAX_PIXELS_PER_BYTE = 1 << 14


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width, height from the first SOFn marker (None when there is none before the scan)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header seen
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def _png_chunks_fit(data: bytes) -> bool:
    """Whether every PNG chunk's declared length fits in the data (OpenCV 4.10+ reads chunks itself and
    allocates the declared length first: one flipped length byte costs 4 GB and seconds)."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if length > len(data) - pos - 12:
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            break
        pos += 12 + length
    return True


def encoded_image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an encoded PNG/JPEG/BMP/GIF declares in its header, None for other or short data."""
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM") and len(data) >= 26:
        if int.from_bytes(data[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    if data.startswith(b"GIF8") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def check_image_size(data: bytes, where: str) -> None:
    """Refuse, before OpenCV allocates anything, an encoded image whose header declares absurd sizes."""
    if data.startswith(b"\x89PNG") and not _png_chunks_fit(data):
        raise CaffeError(f"{where}: encoded png has a chunk longer than the data (truncated or corrupt), refusing")
    size = encoded_image_size(data)
    if size is None:
        return
    pixels = size[0] * size[1]
    if pixels > MAX_IMAGE_PIXELS or pixels > len(data) * MAX_PIXELS_PER_BYTE:
        raise CaffeError(f"{where}: encoded {encoding_of(data)} declares {size[0]}x{size[1]} pixels in {len(data)} "
                         f"bytes (limit {MAX_IMAGE_PIXELS} pixels, {MAX_PIXELS_PER_BYTE} per byte): corrupt or a "
                         "decompression bomb, refusing")


def decode_image(buf: bytes | np.ndarray, mode: str = "native", key: bytes | str | None = None) -> np.ndarray:
    """``cv::imdecode`` of PNG/JPEG/... bytes to C, H, W uint8 (BGR for colour)."""
    data = np.frombuffer(buf, dtype=np.uint8)
    check_image_size(data.tobytes() if isinstance(buf, np.ndarray) else bytes(buf), _where(key))
    try:  # OpenCV asserts (cv2.error) on empty input instead of returning None
        img = cv2.imdecode(data, DECODE_FLAGS[mode]) if data.size else None
    except cv2.error:
        img = None
    if img is None:
        raise CaffeError(f"{_where(key)}: encoded data could not be decoded as an image")
    return image_to_chw(img, key)


def image_to_chw(img: np.ndarray, key: bytes | str | None = None) -> np.ndarray:
    """An OpenCV image (H, W) or (H, W, C) as C, H, W; Caffe only takes 8-bit images (``CV_8U``)."""
    if img.dtype != np.uint8:
        raise CaffeError(f"{_where(key)}: image data type must be unsigned byte, got {img.dtype}")
    if img.ndim == 2:
        return img[None]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def datum_to_array(datum: caffe_pb2.Datum, force_color: bool = False, force_gray: bool = False,
                   key: bytes | str | None = None) -> np.ndarray:
    """The Datum's values as C, H, W: uint8 for ``data`` and encoded images, float32 for ``float_data``.

    ``force_color``/``force_gray`` only change how *encoded* data is decoded (Caffe logs an error and
    ignores them for raw datums).
    """
    if datum.encoded:
        return decode_image(datum.data, decode_mode(force_color, force_gray), key)
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) < 0:
        raise CaffeError(f"{_where(key)}: channels x height x width = {format_shape(shape)} has a negative size")
    count = shape[0] * shape[1] * shape[2]
    if datum.data:
        if len(datum.data) != count:
            raise CaffeError(f"{_where(key)}: data holds {len(datum.data)} bytes but channels x height x width "
                             f"= {format_shape(shape)} = {count}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != count or count == 0:
        raise CaffeError(f"{_where(key)}: float_data holds {len(datum.float_data)} values but channels x height "
                         f"x width = {format_shape(shape)} = {count}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def datum_shape(datum: caffe_pb2.Datum, force_color: bool = False, force_gray: bool = False,
                key: bytes | str | None = None) -> tuple[int, int, int]:
    """C, H, W of the Datum's image (encoded data is decoded to find it, as Caffe's InferBlobShape does).

    A raw Datum's header is checked against its data, so a corrupt header never becomes a blob shape.
    """
    return tuple(datum_to_array(datum, force_color, force_gray, key).shape)


def array_to_datum(array: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """A raw Datum from a C, H, W array: uint8 → ``data`` (as ``CVMatToDatum``), float → ``float_data``."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise CaffeError(f"a Datum holds a C x H x W array, got shape {array.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in array.shape)
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    elif np.issubdtype(array.dtype, np.floating):
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    else:
        raise CaffeError(f"a Datum holds uint8 or float values, got {array.dtype}")
    datum.label = int(label)
    datum.encoded = False
    return datum


def image_to_datum(img: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """``CVMatToDatum`` + ``set_label``: an OpenCV image (H, W[, C]) as a raw C, H, W Datum."""
    return array_to_datum(image_to_chw(img), label)


def encoded_datum(data: bytes, label: int = 0) -> caffe_pb2.Datum:
    """``ReadFileToDatum`` / the imencode branch of ``ReadImageToDatum``: only data, label, encoded."""
    datum = caffe_pb2.Datum()
    datum.data = bytes(data)
    datum.label = int(label)
    datum.encoded = True
    return datum


def label_datum(classes: Sequence[int], label: int = 0) -> caffe_pb2.Datum:
    """Several class indices as one raw Datum of shape (len, 1, 1), one byte each.

    This is the thesis's label LMDB layout (``channels 3, height 1, width 1``: the x, y, z classes as
    uint8), read through a Data layer as a (batch, 3, 1, 1) blob and sliced into three label blobs.
    """
    values = np.asarray(classes)
    if values.ndim != 1 or not len(values) or values.min() < 0 or values.max() > 255:
        raise CaffeError(f"label classes must be a non-empty list of integers in 0..255, got {list(classes)}")
    return array_to_datum(values.astype(np.uint8).reshape(-1, 1, 1), label)


def encoding_of(data: bytes) -> str:
    """'png', 'jpg', ... from the first bytes of an encoded image ('?' when unknown)."""
    magic = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"BM": "bmp", b"GIF8": "gif", b"II*\x00": "tiff",
             b"MM\x00*": "tiff", b"RIFF": "webp"}
    for head, name in magic.items():
        if data.startswith(head):
            return name
    return "?"
