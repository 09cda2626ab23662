"""Caffe's ``tools/convert_imageset.cpp`` and ``tools/compute_image_mean.cpp``.

``convert_imageset ROOT/ LIST DB``: each list line is ``<path> <label>`` (split at the *last* space, as
Caffe's ``find_last_of(' ')``); the image ``ROOT + path`` (plain string concatenation) is read with
OpenCV (BGR, or gray with ``--gray``), resized with ``cv::resize`` (INTER_LINEAR, aspect not kept) when
both ``--resize_height`` and ``--resize_width`` are set, and stored under the key
``%08d_<path>`` (the line's index after the optional shuffle) as a raw Datum (``CVMatToDatum``) or,
with ``--encoded``/``--encode_type``, as encoded bytes: the file's own bytes when the image needs no
change (same colour mode, no resize, extension matching the encoding — ``ReadImageToDatum``),
otherwise ``cv::imencode('.' + type)``. Transactions are committed every 1000 images.

Differences from Caffe, all on bad input: a missing or unreadable image is an error naming the list
line (Caffe logs it and skips the line), and ``--check_size`` compares image shapes (also for encoded
images, where Caffe's check compares byte counts). With a root folder, a listed path that leaves it
(``../``, or an absolute path, which Caffe would glue onto the root) is refused before anything is read.
Images are decoded from their bytes (``cv::imdecode``, the decoder ``imread`` uses, EXIF orientation
included) after their header is checked, so an empty file, a truncated JPEG (which ``imread`` would fill
with grey) or a decompression bomb is refused instead of decoded. A run that fails on bad input removes
the database it created (a partial DB is never left behind as if complete); ``--append`` keeps the records
committed before. A run the machine stops (disk full, file size limit) keeps its committed records, new
database or not, and says so: ``--append`` then finishes it.

``compute_image_mean DB [MEAN]``: the float32 sum of every Datum (encoded ones decoded natively),
accumulated record by record in key order exactly as Caffe's ``float`` BlobProto accumulates, divided
by the count; written as a legacy ``num=1, channels, height, width`` BlobProto.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from converter.errors import CaffeError, format_shape, prefixed
from converter.io import write_blobproto
from data_prep.datum import check_image_size, datum_to_array, encoded_datum, image_to_datum, parse_datum
from data_prep.lmdb_io import INCOMPLETE_MARK, LMDBReader, LMDBWriteError, LMDBWriter, caffe_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListEntry:
    line: int  # 1-based line number in the list file
    path: str
    label: int


def check_under_root(root: str, path: str, where: str) -> None:
    """Refuse a list path that leaves ``root`` once glued to it (Caffe reads ``root + path``, plain text).

    The root folder is ``root`` itself when it ends in '/', else its parent (``root`` is then a file-name
    prefix). The path must stay under it both as written (``..`` resolved lexically) and as the file system
    resolves it (symbolic links followed, against the root's own real path, so a root that is itself a
    link works, but a link inside it to a file elsewhere does not). No root (``""``) means paths are taken
    as they are, as in Caffe.
    """
    if not root:
        return
    if os.path.isabs(path):
        raise CaffeError(f"{where}: '{path}' is an absolute path, but paths are relative to the root folder "
                         f"'{root}' (Caffe would read '{root + path}'); give the path under the root, or an "
                         "empty root")
    base = os.path.normpath(root if root.endswith(("/", os.sep)) else os.path.dirname(root) or ".")
    full = os.path.normpath(root + path)
    rel = os.path.relpath(full, base) if os.path.isabs(full) == os.path.isabs(base) else ".."
    if _leaves(rel):
        raise CaffeError(f"{where}: '{path}' leaves the root folder '{root}' (it resolves to '{full}'); "
                         "listed paths must stay under the root")
    real_base, real = os.path.realpath(base), os.path.realpath(root + path)
    if _leaves(os.path.relpath(real, real_base)):
        raise CaffeError(f"{where}: '{path}' leaves the root folder '{root}' through a symbolic link (it is "
                         f"'{real}'); listed paths must stay under the root")


def _leaves(rel: str) -> bool:
    return rel == os.pardir or rel.startswith(os.pardir + os.sep)


def read_list_text(listfile: str | os.PathLike, kind: str = "a list of '<path> <label>' lines") -> str:
    """A text file's text (image lists, SUN partitions, KITTI poses, tables: ``kind`` says which): refused with
    file:line when it is not UTF-8 or holds a NUL byte (a binary file, or a path no file system can open)."""
    try:
        data = Path(listfile).read_bytes()
    except OSError as e:
        raise CaffeError(f"cannot read list file '{listfile}' ({e.strerror})") from None
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise CaffeError(f"{listfile}:{line}: holds a NUL byte (a binary file, not {kind})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CaffeError(f"{listfile}:{line}: not UTF-8 text (byte {e.start}: {data[e.start]:#04x}); save the file "
                         "as UTF-8") from None
    return text


def read_list(listfile: str | os.PathLike, root: str | None = None) -> list[ListEntry | None]:
    """``<path> <label>`` lines, split at the last space; blank lines are None (they keep their index).

    Caffe parses the label with ``atoi`` (garbage → 0); here a line without an integer label is an error.
    With ``root`` every path must stay under it (:func:`check_under_root`).
    """
    text = read_list_text(listfile)
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # getline() yields no empty line after the final newline
    entries: list[ListEntry | None] = []
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            entries.append(None)
            continue
        path, sep, label = line.rpartition(" ")
        try:
            value = int(label.strip())
        except ValueError:
            value = None
        if not sep or not path or value is None or not -2**31 <= value < 2**31:
            raise CaffeError(f"{listfile}:{n}: expected '<path> <integer label>', got '{line}'")
        if root is not None:
            check_under_root(root, path, f"{listfile}:{n}")
        entries.append(ListEntry(n, path, value))
    if not any(entries):
        raise CaffeError(f"{listfile}: the list is empty")
    return entries


def read_image(filename: str, height: int = 0, width: int = 0, is_color: bool = True, where: str = "") -> np.ndarray:
    """``ReadImageToCVMat``: decode colour (BGR) or gray, then resize to width×height if both are set.

    Every way the file can be unusable is a CaffeError ``<where>: cannot read image '<file>' (<why>)``.
    """
    prefix = f"{where}: " if where else ""

    def refuse(why: str) -> CaffeError:
        return CaffeError(f"{prefix}cannot read image '{filename}' ({why})")

    try:
        data = Path(filename).read_bytes()
    except FileNotFoundError:
        raise refuse("no such file") from None
    except IsADirectoryError:
        raise refuse("it is a folder") from None
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    if not data:
        raise refuse("the file is empty")
    check_image_size(data, f"{prefix}image '{filename}'")
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        img = None
    if img is None:
        raise refuse("not an image OpenCV can decode, or a truncated or corrupt one")
    if height > 0 and width > 0:
        img = cv2.resize(img, (width, height))
    return img


def _match_ext(filename: str, encoding: str) -> bool:
    """``matchExt`` in io.cpp: the file's extension is the encoding (``jpeg`` counts as ``jpg``)."""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def _ordered(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """``map(fn, items)`` on a thread pool (OpenCV releases the GIL), in order, a bounded window ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def convert_imageset(root: str, listfile: str | os.PathLike, db: str | os.PathLike, *, gray: bool = False,
                     shuffle: bool = False, resize_height: int = 0, resize_width: int = 0,
                     check_size: bool = False, encoded: bool = False, encode_type: str = "",
                     mode: str = "new", seed: int | None = None, commit_every: int = 1000,
                     threads: int | None = None) -> dict[str, int]:
    """Write the listed images into an LMDB of Datums as Caffe's convert_imageset; returns counts."""
    is_color = not gray
    resize_height, resize_width = max(0, resize_height), max(0, resize_width)
    entries = read_list(listfile, root)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    threads = threads if threads is not None else min(8, os.cpu_count() or 1)

    def encoding_for(entry: ListEntry) -> str:
        if encode_type or not encoded:
            return encode_type
        if "." not in entry.path:
            raise CaffeError(f"{listfile}:{entry.line}: cannot guess the encoding of '{entry.path}' (no extension); "
                             "pass --encode_type")
        return entry.path.rsplit(".", 1)[1].lower()

    def load(job: tuple[int, ListEntry]) -> tuple[int, ListEntry, bytes, tuple[int, ...]]:
        """``ReadImageToDatum`` for one line: the serialized Datum and the image's shape."""
        line_id, entry = job
        filename = root + entry.path
        img = read_image(filename, resize_height, resize_width, is_color, f"{listfile}:{entry.line}")
        enc = encoding_for(entry)
        if enc:
            channels = img.shape[2] if img.ndim == 3 else 1
            if (channels == 3) == is_color and not resize_height and not resize_width and _match_ext(filename, enc):
                datum = encoded_datum(Path(filename).read_bytes(), entry.label)
            else:
                ok, buf = cv2.imencode("." + enc, img)
                if not ok:
                    raise CaffeError(f"{listfile}:{entry.line}: OpenCV cannot encode '{filename}' as {enc}")
                datum = encoded_datum(buf.tobytes(), entry.label)
        else:
            datum = image_to_datum(img, entry.label)
        return line_id, entry, datum.SerializeToString(), img.shape

    counts = {"written": 0, "skipped": 0}
    first_shape: tuple[tuple[int, ...], int] | None = None
    existed = Path(db).exists()
    writer = LMDBWriter(db, mode=mode, commit_every=commit_every)  # its refusals touch nothing
    try:
        with writer:
            jobs = ((i, e) for i, e in enumerate(entries)
                    if e is not None and not (mode == "append" and caffe_key(i, e.path) in writer))
            for line_id, entry, value, shape in _ordered(load, jobs, threads):
                if check_size:
                    if first_shape is None:
                        first_shape = (shape, entry.line)
                    elif shape != first_shape[0]:
                        raise CaffeError(f"{listfile}:{entry.line}: '{entry.path}' is {shape} (HxW[xC]) but line "
                                         f"{first_shape[1]} was {first_shape[0]} (--check_size)")
                if writer.put(caffe_key(line_id, entry.path), value):
                    counts["written"] += 1
                    if counts["written"] % 1000 == 0:
                        log.info("Processed %d files.", counts["written"])
            counts["skipped"] = sum(1 for i, e in enumerate(entries) if e is not None) - counts["written"]
    except LMDBWriteError as e:  # the machine, not the list: keep what is committed for --append
        raise CaffeError(str(e)) from None
    except CaffeError:
        if mode != "append":  # a new DB that stopped on bad input is not a DB of the list: remove it
            discard_lmdb(Path(db), remove_folder=not existed)
        raise
    log.info("Processed %d files.", counts["written"])
    return counts


def discard_lmdb(path: Path, remove_folder: bool) -> None:
    """Delete the LMDB files this run wrote (and the folder when the run created it)."""
    for name in ("data.mdb", "lock.mdb", INCOMPLETE_MARK):
        (path / name).unlink(missing_ok=True)
    if remove_folder:
        try:
            path.rmdir()
        except OSError:  # something else is in it now: leave the folder
            pass


def compute_image_mean(db: str | os.PathLike, out: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The mean Datum of an LMDB as (1, C, H, W) float32, and the per-channel means Caffe logs."""
    with LMDBReader(db) as reader:
        key, value = reader.first()
        with prefixed(f"LMDB '{db}'"):  # a bad record names its database
            shape = datum_to_array(parse_datum(value, key), key=key).shape
            total = np.zeros(shape, dtype=np.float32)
            flat = total.reshape(-1)
            count = 0
            for key, value in reader.items():
                values = datum_to_array(parse_datum(value, key), key=key)
                if values.size != flat.size:
                    raise CaffeError(f"record '{key.decode(errors='replace')}': {values.size} values "
                                     f"({format_shape(values.shape)}) but the first record has {flat.size} "
                                     f"({format_shape(shape)})")
                flat += values.reshape(-1)  # float32 += uint8/float32, record by record: Caffe's float sums
                count += 1
                if count % 10000 == 0:
                    log.info("Processed %d files.", count)
    mean = (total / np.float32(count)).astype(np.float32)[None]
    c = mean.shape[1]
    # Caffe sums each channel of the mean image in float, pixel by pixel (cumsum is sequential too).
    channel_means = np.cumsum(mean.reshape(c, -1), axis=1, dtype=np.float32)[:, -1] / np.float32(mean[0, 0].size)
    if out is not None:
        write_blobproto(out, mean, legacy_4d=True)
    return mean, channel_means
