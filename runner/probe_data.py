"""Labelled images for the probes: lists, SUN397 partitions, LMDBs, N-per-class splits, and pixels.

Sources of samples (each a ``ref`` and an integer label):

* a ``path label`` list as ``convert_imageset`` reads it (the label is the last field; tab-separated
  files with more columns keep the first as the path; a header line whose label is not an integer is
  skipped), paths relative to ``root``;
* SUN397's official partitions ``Training_NN.txt`` / ``Testing_NN.txt`` (lines ``/a/abbey/sun_x.jpg``;
  the class is the path between the letter folder and the file, classes numbered in sorted order as in
  ``ClassName.txt``), images under the SUN397 folder;
* a Caffe LMDB of Datum records (``lmdb:<folder>::<key>``), as the thesis fed its probes.

Splits (:func:`splits`): for each partition, N training images per class drawn without replacement by
a numpy Generator seeded with ``(seed, partition, N)``; the test set is the given test pool (optionally
its first K per class — the thesis' SUN test LMDBs held only the first 5 or 20 test images per class),
or, without a test pool, every image of the class not drawn for training.

Pixels (:class:`ImageSource`): OpenCV decodes (BGR, as Caffe's ``ReadImageToDatum``), optionally
zero-pads to a centred square (the thesis' ``preprocess_SUN.py``) and resizes with ``cv::resize``
bilinear (``convert_imageset --resize_height/--resize_width``), then Caffe's TEST-phase
``DataTransformer`` (:class:`data_prep.transform.Transformer`: centre crop, mean, scale).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from converter import caffe_pb2
from converter.errors import CaffeError
from data_prep.imageset import check_under_root, read_list_text
from data_prep.transform import Transformer

LMDB_PREFIX = "lmdb:"


@dataclass(frozen=True)
class Sample:
    ref: str
    label: int


# -- sources ----------------------------------------------------------------------------------------

def read_list(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Sample]:
    """``path label`` lines (see the module docstring); blank lines and ``#`` comments are skipped. With an
    explicit ``root``, relative paths must stay under it, as the image-list readers of the data layers."""
    path = Path(path)
    lines = read_list_text(path).splitlines()
    base = Path(root) if root is not None else path.parent
    samples = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split("\t") if "\t" in text else text.rsplit(None, 1)
        label_text = fields[-1].strip() if len(fields) > 1 else ""
        if not re.fullmatch(r"-?\d+", label_text):
            if not samples and number == 1 and len(fields) > 1:
                continue  # a header
            raise CaffeError(f"{path}:{number}: expected 'path label' with an integer label, got '{text}'")
        ref = fields[0].strip()
        if root is not None and not os.path.isabs(ref):  # an explicit root: its paths may not leave it
            check_under_root(os.path.join(str(root), ""), ref, f"{path}:{number}")
        samples.append(Sample(str(base / ref) if not os.path.isabs(ref) else ref, int(label_text)))
    if not samples:
        raise CaffeError(f"{path}: no 'path label' lines")
    return samples


def sun_class(line: str) -> str:
    """``/a/abbey/sun_x.jpg`` → ``abbey``; ``/b/bakery/shop/sun_x.jpg`` → ``bakery/shop``."""
    parts = line.strip().strip("/").split("/")
    if len(parts) < 3:
        raise CaffeError(f"not a SUN397 image path: '{line}'")
    return "/".join(parts[1:-1])


def find_partition_file(sun_dir: Path, kind: str, k: int) -> Path:
    for folder in (sun_dir, sun_dir / "Partitions", sun_dir.parent / "Partitions"):
        candidate = folder / f"{kind}_{k:02d}.txt"
        if candidate.exists():
            return candidate
    raise CaffeError(f"{sun_dir}: no {kind}_{k:02d}.txt (looked in it, Partitions/ and ../Partitions/)")


def sun_partition(sun_dir: str | os.PathLike, k: int, images: str | os.PathLike | None = None
                  ) -> tuple[list[Sample], list[Sample], list[str]]:
    """(train, test, class names) of SUN397's official partition ``k`` (1..10)."""
    sun_dir = Path(sun_dir)
    images = Path(images) if images else sun_dir
    lists = {}
    for kind in ("Training", "Testing"):
        f = find_partition_file(sun_dir, kind, k)
        text = read_list_text(f, "a SUN397 partition file (one image path a line)")
        lists[kind] = [line.strip() for line in text.splitlines() if line.strip()]
    classes = sorted({sun_class(line) for lines in lists.values() for line in lines})
    index = {c: i for i, c in enumerate(classes)}

    def samples(lines):
        return [Sample(str(images / line.lstrip("/")), index[sun_class(line)]) for line in lines]

    return samples(lists["Training"]), samples(lists["Testing"]), classes


def read_lmdb(path: str | os.PathLike) -> list[Sample]:
    """Every record of a Datum LMDB, in key order, with its label."""
    from data_prep.datum import parse_datum
    from data_prep.lmdb_io import LMDBReader

    with LMDBReader(path) as reader:
        return [Sample(f"{LMDB_PREFIX}{path}::{key.decode(errors='surrogateescape')}", parse_datum(value, key).label)
                for key, value in reader.items()]


# -- splits -----------------------------------------------------------------------------------------

def by_class(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return dict(sorted(groups.items()))


def choose(pool: list[Sample], per_class: int, seed: int, partition: int, keep_one: bool = False
           ) -> tuple[list[Sample], list[Sample]]:
    """``per_class`` samples of every class drawn without replacement (seeded), and the rest, in pool order."""
    rng = np.random.default_rng([seed, partition, per_class])
    chosen_all, rest = [], []
    for label, group in by_class(pool).items():
        if len(group) < per_class + keep_one:
            need = " (plus one left for testing)" if keep_one else ""
            raise CaffeError(f"class {label} has {len(group)} training images, {per_class} per class asked{need}")
        chosen = set(rng.choice(len(group), per_class, replace=False).tolist())
        chosen_all.extend(group[i] for i in sorted(chosen))
        rest.extend(group[i] for i in range(len(group)) if i not in chosen)
    return chosen_all, rest


def split(train_pool: list[Sample], test_pool: list[Sample] | None, per_class: int, seed: int, partition: int,
          test_per_class: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """One partition: ``per_class`` training images per class (seeded), and its test images."""
    train, rest = choose(train_pool, per_class, seed, partition, keep_one=test_pool is None)
    test = test_pool if test_pool is not None else rest
    if test_per_class is not None:
        test = [s for group in by_class(test).values() for s in group[:test_per_class]]
    if not test:
        raise CaffeError("no test images left for this split")
    return train, test


# -- pixels -----------------------------------------------------------------------------------------

class ImageSource:
    """Decode, pad, resize and transform samples into the network's input (float32 N×C×H×W)."""

    def __init__(self, transform: caffe_pb2.TransformationParameter, input_chw: tuple[int, int, int],
                 resize: tuple[int, int] | None = None, pad_square: bool = False):
        self.transformer = Transformer(transform, caffe_pb2.TEST, "probe transform")
        if self.transformer.mirror:
            raise CaffeError("probe transform: mirror is random even in TEST (Caffe draws it); switch it off "
                             "for feature extraction")
        self.channels, h, w = input_chw
        if resize is None:
            if self.transformer.mean is not None:
                resize = tuple(self.transformer.mean.shape[1:])
            elif not self.transformer.crop:
                resize = (h, w)
        self.resize = resize
        self.pad_square = pad_square
        self.transformer.check((self.channels, *self.resize) if self.resize else (self.channels, h, w))
        out = self.transformer.crop or None
        if out is not None and (out, out) != (h, w) or out is None and self.resize != (h, w):
            got = (out, out) if out else self.resize
            raise CaffeError(f"probe transform gives {got[0]}x{got[1]} images but the network takes {h}x{w}")

    def load(self, ref: str) -> np.ndarray:
        """One sample as C×H×W uint8 (BGR), padded and resized as configured."""
        if ref.startswith(LMDB_PREFIX):
            img = self._from_lmdb(ref)
        else:
            flag = cv2.IMREAD_COLOR if self.channels == 3 else cv2.IMREAD_GRAYSCALE
            img = cv2.imread(ref, flag)
            if img is None:
                raise CaffeError(f"{ref}: cannot read the image")
            img = img[:, :, None] if img.ndim == 2 else img
            img = img.transpose(2, 0, 1)
        if img.shape[0] != self.channels:
            raise CaffeError(f"{ref}: {img.shape[0]} channels, the network takes {self.channels}")
        if self.pad_square:
            img = pad_to_square(img)
        if self.resize and img.shape[1:] != tuple(self.resize):
            h, w = self.resize
            resized = cv2.resize(np.ascontiguousarray(img.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
            img = (resized[:, :, None] if resized.ndim == 2 else resized).transpose(2, 0, 1)
        return np.ascontiguousarray(img)

    def batch(self, refs: list[str]) -> np.ndarray:
        return self.transformer([self.load(r) for r in refs])

    def _from_lmdb(self, ref: str) -> np.ndarray:
        from data_prep.datum import datum_to_array, parse_datum
        from data_prep.lmdb_io import acquire_reader

        path, _, key = ref[len(LMDB_PREFIX):].rpartition("::")
        reader = acquire_reader(path)
        raw = reader.get(key.encode(errors="surrogateescape"))
        return datum_to_array(parse_datum(raw, key), self.transformer.force_color, self.transformer.force_gray)


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Zero borders around a C×H×W image to make it square, centred (the thesis' SUN preprocessing)."""
    _, h, w = img.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((img.shape[0], side, side), dtype=img.dtype)
    out[:, top:top + h, left:left + w] = img
    return out
