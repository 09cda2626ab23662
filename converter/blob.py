"""A Caffe blob as numpy arrays (``data`` and ``diff``), the face Python layers and pycaffe scripts see."""

from __future__ import annotations

import numpy as np


class Blob:
    """``data`` and ``diff`` are float32 numpy arrays; ``reshape`` reallocates both, as Caffe's Blob::Reshape."""

    def __init__(self, data: np.ndarray, diff: np.ndarray | None = None):
        self.data = data
        self.diff = diff if diff is not None else np.zeros_like(data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    @property
    def num(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def channels(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    @property
    def height(self) -> int:
        return self.shape[2] if len(self.shape) > 2 else 1

    @property
    def width(self) -> int:
        return self.shape[3] if len(self.shape) > 3 else 1

    def reshape(self, *shape: int) -> None:
        if self.data.shape != tuple(shape):
            self.data = np.zeros(shape, np.float32)
            self.diff = np.zeros(shape, np.float32)
