"""The IDX format of MNIST (``train-images-idx3-ubyte[.gz]``): a big-endian header, then raw values.

Header: two zero bytes, a type code (0x08 = uint8 …), the number of axes, then one uint32 per axis.
Truncated or inconsistent files are refused with a one-line error naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from converter.errors import CaffeError

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MAX_BYTES = 1 << 32  # refuse headers that declare absurd sizes before allocating


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (raw or gzip) as a numpy array with the file's axes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
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
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_TYPES[code])
    need = int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize
    if need > MAX_BYTES:
        raise CaffeError(f"{path}: header declares {need} bytes of data, refusing")
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise CaffeError(f"{path}: holds {len(body)} bytes of data, its header {shape} needs {need}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
