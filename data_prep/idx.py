"""The IDX format of MNIST (``train-images-idx3-ubyte[.gz]``): a big-endian header, then raw values.

Header: two zero bytes, a type code (0x08 = uint8 …), the number of axes, then one uint32 per axis.
Truncated or inconsistent files are refused with a one-line error naming the file.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from converter.errors import CaffeError

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MAX_BYTES = 1 << 32  # refuse headers that declare absurd sizes before allocating
DEFLATE_MAX_RATIO = 1032  # deflate never expands more than ~1032:1: a larger declared size is a lie or a bomb


def _header(raw: bytes, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes of data) from a complete header; the size is a Python int (no int64 wrap)."""
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_TYPES[raw[2]])
    need = math.prod(shape) * dtype.itemsize
    if need > MAX_BYTES:
        raise CaffeError(f"{path}: header declares {need} bytes of data, refusing")
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_BYTES:  # numpy refuses such an empty array too
        raise CaffeError(f"{path}: header declares absurd axes {shape}, refusing")
    return shape, dtype, need


def _gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress at most what the IDX header declares (+1 byte to see excess): a gzip bomb or a header
    declaring absurd sizes is refused before the memory is allocated."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    head = inflater.decompress(raw, 4)
    if len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in _TYPES and head[3]:
        head += inflater.decompress(inflater.unconsumed_tail, 4 * head[3])
    if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _TYPES or not head[3] or len(head) < 4 + 4 * head[3]:
        return head  # read_idx reports what is wrong with the header
    _, _, need = _header(head, path)
    if need > len(raw) * DEFLATE_MAX_RATIO:
        raise CaffeError(f"{path}: header declares {need} bytes of data but the file has only {len(raw)} "
                         "compressed bytes, refusing")
    body = inflater.decompress(inflater.unconsumed_tail, need + 1)
    if len(body) > need:
        raise CaffeError(f"{path}: holds more data than its header declares ({need} bytes)")
    if not inflater.eof:
        raise CaffeError(f"{path}: cannot read IDX file (truncated gzip stream)")
    return head + body


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (raw or gzip) as a numpy array with the file's axes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _gunzip(raw, path)
    except FileNotFoundError:
        raise CaffeError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise CaffeError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise CaffeError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _TYPES:
        raise CaffeError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise CaffeError(f"{path}: truncated IDX header")
    shape, dtype, need = _header(raw, path)
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise CaffeError(f"{path}: holds {len(body)} bytes of data, its header {shape} needs {need}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
