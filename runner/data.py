"""Batches for a net's data layers, with Caffe's semantics; what the training loop feeds the net.

``NetFeeder(net, phase, seed)`` turns every data layer of a filtered NetParameter into a stream of
batches, all layers in lock-step (batch ``b`` of every layer is produced together):

* ``Data`` (``data_layer.cpp``): LMDB records in key order, wrapping to the first key with the log
  line ``Restarting data prefetching from start.``; in TRAIN with ``world_size`` ranks, rank ``r``
  keeps the records whose running offset ``o`` (counted across wraps) has ``o % world_size == r``
  (``DataLayer::Skip``; TEST nets never skip, only rank 0 tests in Caffe). Record ``k`` of rank ``r``
  is therefore ``(k * world_size + r) % N``, so two Data layers over LMDBs with equal keys stay aligned.
  Labels are ``datum.label`` as float32, shape ``(batch,)``.
* ``ImageData`` (``image_data_layer.cpp``): ``<path> <label>`` lines, images read with OpenCV from
  ``root_folder + path`` (colour BGR or gray by ``is_color``), resized to ``new_height × new_width``
  when both are set; ``shuffle`` reshuffles at every pass; ``rand_skip`` skips ``Rand(rand_skip)``
  lines once at the start. (Caffe 1.0's ImageData does not split records between ranks; here TRAIN
  ranks take every ``world_size``-th line as for Data, so ranks do not train on identical batches.)
* ``DummyData``: each top filled by its filler (none: constant 0; one: for all tops; else one per top),
  constant fillers once, random ones every batch (``dummy_data_layer.cpp``).
* ``Input`` tops are not fed here (the caller supplies them); ``MemoryData``, ``HDF5Data`` and
  ``WindowData`` are refused.

``transform_param`` is :class:`data_prep.transform.Transformer`. All randomness of batch ``b`` of the
data layer at index ``i`` comes from ``numpy.random.default_rng([seed, phase, i, b])``, so a seeded
run is bit-reproducible and independent of the number of worker processes; ``workers > 0`` prefetches
batches in worker processes (:mod:`runner.prefetch`: a ring of shared-memory slots, as Caffe's ``prefetch``
threads fill theirs), copied out into pinned memory when the target device is CUDA. Sources are opened
relative to the working directory, as Caffe opens them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from converter import caffe_pb2
from converter.errors import CaffeError, format_shape, layer_error, prefixed
from converter.fillers import fill
from converter.layers import layer_class
from data_prep.datum import datum_shape, datum_to_array, decode_mode, image_to_chw, parse_datum
from data_prep.imageset import read_image, read_list
from data_prep.lmdb_io import RESTART_MESSAGE, LMDBReader, acquire_reader, incomplete, release_reader
from data_prep.transform import Transformer
from runner.prefetch import BufferPool, Prefetcher

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

_UNSUPPORTED = {
    "MemoryData": "it is fed from C++/Python code at run time; use an Input layer and feed the blob yourself",
    "HDF5Data": "HDF5 sources are not implemented; convert the data to an LMDB of Datums "
                "(data_prep.lmdb_io.LMDBWriter with data_prep.datum.array_to_datum)",
    "WindowData": "window sampling for detection is not implemented",
}


def _what(lp: caffe_pb2.LayerParameter) -> str:
    return f"layer '{lp.name}' ({lp.type})"


def _batch_size(lp: caffe_pb2.LayerParameter, value: int) -> int:
    if value <= 0:
        raise layer_error(lp.name, lp.type, f"batch_size must be positive, got {value}")
    return int(value)


def _tops(lp: caffe_pb2.LayerParameter, batch: int, item: Shape) -> dict[str, Shape]:
    """Data top (batch, C, H, W) and, when a second top is named, the label top (batch,)."""
    shapes = {lp.top[0]: (batch, *item)}
    if len(lp.top) > 1:
        shapes[lp.top[1]] = (batch,)
    return shapes


# ---------------------------------------------------------------------------------------------
# Shapes without building a feeder (for check, export and the trainer's nets)
# ---------------------------------------------------------------------------------------------
def data_layer_shapes(lp: caffe_pb2.LayerParameter, phase: int) -> dict[str, Shape]:
    """Top shapes of one data layer read from its source.

    Data: the first Datum of the LMDB after the crop → (batch, C, crop|H, crop|W) and label (batch,);
    ImageData: the first image of the list (resized as the layer resizes); other layers, a missing
    source, a LevelDB: ``{}`` (the net then asks for the shapes). Data that is present but does not
    fit the transform (crop larger than the image, a mean of another shape) is a CaffeError.
    """
    if not lp.top:
        return {}
    if lp.type == "Data":
        dp = lp.data_param
        if dp.backend != caffe_pb2.DataParameter.LMDB or not Path(dp.source).exists():
            return {}  # absent: the caller asks for the shapes; present but not an LMDB: refused below
        transformer = Transformer(lp.transform_param, phase, _what(lp))
        reader = acquire_reader(dp.source, _what(lp))
        try:
            key, value = reader.first()
        finally:
            release_reader(reader)
        with prefixed(f"{_what(lp)}: LMDB '{dp.source}'"):
            chw = datum_shape(parse_datum(value, key), transformer.force_color, transformer.force_gray, key)
        return _tops(lp, _batch_size(lp, dp.batch_size), transformer.output_shape(chw))
    if lp.type == "ImageData":
        p = lp.image_data_param
        if not Path(p.source).is_file():
            return {}
        source = _ImageListSource(lp, phase, seed=0, index=0, rank=0, world_size=1)
        return source.shapes
    return {}


# ---------------------------------------------------------------------------------------------
# Sources: one per data layer; picklable, opened lazily in whichever process reads them
# ---------------------------------------------------------------------------------------------
class _Source:
    tops: list[str]
    shapes: dict[str, Shape]

    def load(self, b: int, rng: np.random.Generator, into: dict[str, torch.Tensor] | None = None
             ) -> dict[str, np.ndarray | torch.Tensor]:
        """Batch ``b`` of this layer's tops; the data top written into ``into``'s tensor for it when given."""
        raise NotImplementedError

    def data_tensor(self, shape: Shape, into: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Where this batch's data top is written: the caller's tensor for it (a worker's shared-memory slot,
        so the batch is never copied inside the worker) when it has this shape, else a new one."""
        target = (into or {}).get(self.tops[0])
        if target is not None and tuple(target.shape) == tuple(shape):
            return target
        return torch.empty(shape, dtype=torch.float32)

    def restarts(self, b: int) -> int:
        """How many times reading batch ``b`` wraps to the first record (Caffe logs each one)."""
        return 0

    def close(self) -> None:
        """Release what this process opened."""


class _StridedSource(_Source):
    """Record ``k`` of the stream is offset ``k * stride + start`` (Caffe's skip for ranks in TRAIN)."""

    def __init__(self, lp: caffe_pb2.LayerParameter, phase: int, rank: int, world_size: int, batch: int):
        split = world_size > 1 and phase == caffe_pb2.TRAIN
        self.stride, self.start = (world_size, rank) if split else (1, 0)
        self.batch = batch
        self.tops = list(lp.top)

    def offsets(self, b: int) -> np.ndarray:
        k = np.arange(b * self.batch, (b + 1) * self.batch, dtype=np.int64)
        return k * self.stride + self.start


class _LMDBSource(_StridedSource):
    def __init__(self, lp: caffe_pb2.LayerParameter, phase: int, rank: int, world_size: int):
        dp = lp.data_param
        what = _what(lp)
        if dp.backend != caffe_pb2.DataParameter.LMDB:
            raise CaffeError(f"{what}: backend LEVELDB (the default when data_param has no backend) is not "
                             f"supported; convert '{dp.source}' to an LMDB and set backend: LMDB")
        super().__init__(lp, phase, rank, world_size, _batch_size(lp, dp.batch_size))
        self.what, self.path = what, dp.source
        self.transformer = Transformer(lp.transform_param, phase, what)
        self.decode = decode_mode(self.transformer.force_color, self.transformer.force_gray)
        reader = acquire_reader(dp.source, what)
        try:
            key, value = reader.first()
            self.keys = reader.keys()
        finally:
            release_reader(reader)
        with prefixed(f"{what}: LMDB '{dp.source}'"):
            first = parse_datum(value, key)
            chw = datum_shape(first, self.transformer.force_color, self.transformer.force_gray, key)
        self.chw, self.first_key = tuple(chw), key
        self.shapes = _tops(lp, self.batch, self.transformer.output_shape(chw))
        if (self.transformer.force_color or self.transformer.force_gray) and not first.encoded:
            log.warning("%s: force_color and force_gray only for encoded datum (ignored, as in Caffe)", what)
        if dp.rand_skip:
            log.warning("%s: data_param.rand_skip is ignored (Caffe 1.0's Data layer does not use it)", what)
        writer = incomplete(dp.source)
        if writer:
            log.warning("%s: LMDB '%s' is INCOMPLETE: its writer (%s) stopped before it finished; it holds "
                        "only the %d records it committed", what, dp.source, writer, len(self.keys))
        self._reader: tuple[int, LMDBReader] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def reader(self) -> LMDBReader:
        """This process's reader (a handle is never reused across fork)."""
        if self._reader is None or self._reader[0] != os.getpid():
            self._reader = (os.getpid(), acquire_reader(self.path, self.what))
        return self._reader[1]

    def close(self) -> None:
        if self._reader is not None and self._reader[0] == os.getpid():
            release_reader(self._reader[1])
        self._reader = None

    def load(self, b, rng, into=None):
        reader = self.reader()
        n = len(self.keys)
        items, labels = [], np.empty(self.batch, dtype=np.float32)
        tf = self.transformer
        keys = [self.keys[int(i)] for i in self.offsets(b) % n]
        with prefixed(f"{self.what}: LMDB '{self.path}'"):  # one context per batch: 18 % of the data time
            for j, (key, value) in enumerate(zip(keys, reader.values(keys), strict=True)):
                datum = parse_datum(value, key)
                item = datum_to_array(datum, tf.force_color, tf.force_gray, key)
                if item.shape != self.chw:
                    raise CaffeError(f"record {key.decode(errors='replace')!r}: {format_shape(item.shape)}, but the "
                                     f"first record {self.first_key.decode(errors='replace')!r}, which shaped the "
                                     f"net, is {format_shape(self.chw)}: every record must have one shape")
                items.append(item)
                labels[j] = datum.label
        data = self.data_tensor(tf.batch_shape(items), into)
        tf(items, rng, out=data.numpy())
        out = {self.tops[0]: data}
        if len(self.tops) > 1:
            out[self.tops[1]] = labels
        return out

    def restarts(self, b: int) -> int:
        """Caffe's ``Next()`` logs a restart each time the offset after a read record (or a skipped
        one) is a multiple of N; batch ``b`` passes offsets ``last(b-1)+1 .. last(b)``."""
        n = len(self.keys)
        last = int(self.offsets(b)[-1])
        first = int(self.offsets(b - 1)[-1]) + 1 if b > 0 else 0
        return (last + 1) // n - first // n


class _ImageListSource(_StridedSource):
    def __init__(self, lp: caffe_pb2.LayerParameter, phase: int, seed: int, index: int, rank: int,
                 world_size: int):
        p = lp.image_data_param
        what = _what(lp)
        if not ((p.new_height == 0 and p.new_width == 0) or (p.new_height > 0 and p.new_width > 0)):
            raise CaffeError(f"{what}: new_height and new_width must be set together")
        super().__init__(lp, phase, rank, world_size, _batch_size(lp, p.batch_size))
        if len(lp.top) != 2:
            raise CaffeError(f"{what}: takes 2 tops (data, label), got {len(lp.top)}")
        if not Path(p.source).is_file():
            rel = "" if Path(p.source).is_absolute() else f" (relative to the working directory {os.getcwd()})"
            raise CaffeError(f"{what}: image list '{p.source}' does not exist{rel}")
        self.what, self.listfile = what, p.source
        with prefixed(what):
            self.lines = [(e.path, e.label, e.line) for e in read_list(p.source, p.root_folder) if e is not None]
        self.root, self.height, self.width, self.is_color = p.root_folder, p.new_height, p.new_width, p.is_color
        self.shuffle, self.seed, self.index, self.phase = p.shuffle, seed, index, phase
        self.transformer = Transformer(lp.transform_param, phase, what)
        self.skip = 0
        if p.rand_skip:
            self.skip = int(np.random.default_rng([seed, phase, index, 1]).integers(p.rand_skip))
            if self.skip >= len(self.lines):
                raise CaffeError(f"{what}: not enough lines ({len(self.lines)}) to skip {self.skip}")
        self._perm: tuple[int, np.ndarray] | None = None
        first = self.image(self.line(0))
        self.shapes = _tops(lp, self.batch, self.transformer.output_shape(first.shape))

    def line(self, position: int) -> int:
        """The list index read at stream position ``position`` (reshuffled at every pass if shuffle)."""
        epoch, j = divmod(position + self.skip, len(self.lines))
        if not self.shuffle:
            return j
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, self.phase, self.index, 2, epoch])
            self._perm = (epoch, rng.permutation(len(self.lines)))
        return int(self._perm[1][j])

    def image(self, i: int) -> np.ndarray:
        path, _, n = self.lines[i]
        img = read_image(self.root + path, self.height, self.width, self.is_color, f"{self.what}: {self.listfile}:{n}")
        return image_to_chw(img, path)

    def load(self, b, rng, into=None):
        indices = [self.line(int(o)) for o in self.offsets(b)]
        items = [self.image(i) for i in indices]
        labels = np.array([self.lines[i][1] for i in indices], dtype=np.float32)
        data = self.data_tensor(self.transformer.batch_shape(items), into)
        self.transformer(items, rng, out=data.numpy())
        return {self.tops[0]: data, self.tops[1]: labels}


class _DummySource(_Source):
    def __init__(self, lp: caffe_pb2.LayerParameter, phase: int):
        layer = layer_class(lp)(lp, [], phase)
        self.tops = list(lp.top)
        self.shapes = dict(zip(self.tops, layer.top_shapes, strict=True))
        fillers = list(lp.dummy_data_param.data_filler)
        if len(fillers) not in (0, 1, len(self.tops)):
            raise CaffeError(f"{_what(lp)}: number of data fillers must be 0, 1 or the number of tops "
                             f"({len(self.tops)}), got {len(fillers)}")
        if not fillers:
            fillers = [caffe_pb2.FillerParameter()]  # the schema's default filler: constant 0
        self.fillers = {t: fillers[0 if len(fillers) == 1 else i] for i, t in enumerate(self.tops)}
        self.fixed = {t: fill(f, self.shapes[t], f"{_what(lp)} top '{t}'")
                      for t, f in self.fillers.items() if f.type == "constant"}
        self.what = _what(lp)

    def load(self, b, rng, into=None):
        out = {}
        for t, f in self.fillers.items():
            if t in self.fixed:
                out[t] = self.fixed[t].clone()
            else:
                g = torch.Generator().manual_seed(int(rng.integers(2**63)))
                out[t] = fill(f, self.shapes[t], f"{self.what} top '{t}'", generator=g)
        return out


# ---------------------------------------------------------------------------------------------
# The feeder
# ---------------------------------------------------------------------------------------------
class _Batches:
    """Batch ``b`` of every source, as CPU float32 tensors (the data tops written into ``into`` when given)."""

    def __init__(self, sources: list[tuple[int, _Source]], seed: int, phase: int):
        self.sources, self.seed, self.phase = sources, seed, phase

    def __call__(self, b: int, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for index, source in self.sources:
            rng = np.random.default_rng([self.seed, self.phase, index, b])
            for top, value in source.load(b, rng, into).items():
                out[top] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)) \
                    if isinstance(value, np.ndarray) else value
        return out


def _worker_init() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class NetFeeder:
    """Batches for every data layer of a (filtered) net, in lock-step, with Caffe's semantics.

    ``next()`` returns one batch as ``{top name: float32 tensor}`` on ``device`` (labels ``(batch,)``).
    ``seed`` None (or negative, Caffe's ``random_seed: -1``) draws a fresh seed. ``start_batch`` starts
    the streams at a later batch (Caffe itself restarts its data at the first record on resume).
    """

    def __init__(self, net: caffe_pb2.NetParameter, phase: int, seed: int | None = None,
                 rank: int = 0, world_size: int = 1, workers: int = 0, device: str | torch.device = "cpu",
                 start_batch: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise CaffeError(f"rank {rank} is not in 0..{world_size - 1}")
        self.phase, self.rank, self.world_size = phase, rank, world_size
        self.seed = int(seed) if seed is not None and seed >= 0 else int(np.random.SeedSequence().entropy)
        self.device = torch.device(device)
        self.sources: list[tuple[int, _Source]] = []
        for index, lp in enumerate(net.layer):
            if lp.type == "Data":
                source: _Source = _LMDBSource(lp, phase, rank, world_size)
            elif lp.type == "ImageData":
                source = _ImageListSource(lp, phase, self.seed, index, rank, world_size)
            elif lp.type == "DummyData":
                source = _DummySource(lp, phase)
            elif lp.type in _UNSUPPORTED:
                raise CaffeError(f"{_what(lp)}: not supported by the data feeder: {_UNSUPPORTED[lp.type]}")
            else:
                continue  # Input (fed by the caller) and compute layers
            self.sources.append((index, source))
        self.shapes: dict[str, Shape] = {t: s for _, src in self.sources for t, s in src.shapes.items()}
        self.batch = start_batch
        self.workers = workers if self.sources else 0
        self._dataset = _Batches(self.sources, self.seed, phase)
        self._iter = None  # the worker pool, started by the first next()
        self._pool = BufferPool()  # what batches read in this process are written into

    def _start_workers(self) -> None:
        self._iter = Prefetcher(self._dataset, self.shapes, self.batch, self.workers,
                                depth=max(4, 2 * self.workers), init=_worker_init, pin=self.device.type == "cuda")

    def _stop_workers(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def skip(self, batches: int) -> None:
        """Move the streams ``batches`` batches ahead without reading them (resuming a run)."""
        if batches > 0:
            self._stop_workers()  # prefetched batches are for the old position
            self.batch += batches

    def next(self) -> dict[str, torch.Tensor]:
        b = self.batch
        if self.rank == 0:
            for _, source in self.sources:
                for _ in range(source.restarts(b)):
                    log.info(RESTART_MESSAGE)
        if self.workers:
            if self._iter is None:
                self._start_workers()
            try:
                out = self._iter.next()
            except (CaffeError, RuntimeError):
                self._stop_workers()  # a retry restarts at this batch, as the synchronous path would
                raise
        else:
            out = self._dataset(b, {t: self._pool.take(s) for t, s in self.shapes.items()})
        self.batch += 1
        if self.device.type != "cpu":
            out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
        return out

    __next__ = next

    def constant_tops(self) -> dict[str, torch.Tensor]:
        """DummyData tops with constant fillers, filled once (Caffe refills only the random ones): a caller
        that writes into these tensors changes what every later batch holds, as a pycaffe script that sets
        a DummyData label blob does (read in this process: ``workers`` 0)."""
        return {t: v for _, src in self.sources if isinstance(src, _DummySource) for t, v in src.fixed.items()}

    def __iter__(self):
        return self

    def close(self) -> None:
        self._stop_workers()
        for _, source in self.sources:
            source.close()

    def __enter__(self) -> NetFeeder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def peek_data_shapes(net: caffe_pb2.NetParameter) -> dict[str, Shape]:
    """Shapes of every data top whose source can be read; the others are left to the caller."""
    shapes: dict[str, Shape] = {}
    for lp in net.layer:
        shapes.update(data_layer_shapes(lp, net.state.phase))
    return shapes
