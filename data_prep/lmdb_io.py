"""LMDB databases of Caffe records: a crash-safe batched writer and a key-ordered reader.

Caffe (``src/caffe/util/db_lmdb.cpp``) keeps one unnamed LMDB database in a folder (``data.mdb`` +
``lock.mdb``), writes it through transactions committed every 1000 puts (``convert_imageset``) and
doubles the map size when a commit hits ``MDB_MAP_FULL``. Readers walk a cursor in key order
(lexicographic bytes) and, in the Data layer, wrap to the first key with the log line
``Restarting data prefetching from start.`` (``data_layer.cpp:Next``); with several solvers each one
keeps every ``solver_count``-th record (``Skip``).

Crash safety comes from LMDB itself: a transaction is durable once its commit returns (``sync``), so
a writer killed at any instant leaves a database that opens and holds exactly the records of the
transactions committed before — a prefix of what was being written. ``append`` mode then resumes by
skipping keys already present; ``overwrite`` rebuilds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb
import numpy as np

from converter.errors import CaffeError
from data_prep import lmdb_check

log = logging.getLogger(__name__)

RESTART_MESSAGE = "Restarting data prefetching from start."
INCOMPLETE_MARK = "egomotion-writing"
"""A file a writer keeps in the LMDB folder while it writes and removes when it has written everything: a
database that still has it was stopped part way (killed, or the disk filled). LMDB and Caffe never look
at other files in the folder, so a marked database stays readable everywhere."""
_LMDB_FILES = {"data.mdb", "lock.mdb", INCOMPLETE_MARK}


def incomplete(path: str | os.PathLike) -> str | None:
    """What the marker of an interrupted writer says (its command and start), or None for a finished DB."""
    mark = Path(path) / INCOMPLETE_MARK
    try:
        return mark.read_text(errors="replace").strip() or "a writer"
    except OSError:
        return None


def caffe_key(index: int, name: str | None = None) -> bytes:
    """``caffe::format_int(index, 8) + "_" + name`` (convert_imageset) or ``%08d`` alone."""
    return (f"{index:08d}_{name}" if name is not None else f"{index:08d}").encode()


def looks_like_leveldb(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "CURRENT").exists() and (any(p.glob("*.ldb")) or any(p.glob("*.log")))


class LMDBWriteError(CaffeError):
    """A commit the machine refused (disk full, file size limit), not bad input: the DB still holds the
    ``committed`` records (all of its entries) of the transactions before, which ``--append`` completes."""

    def __init__(self, message: str, committed: int):
        super().__init__(message)
        self.committed = committed

    def __reduce__(self):
        return type(self), (str(self), self.committed)


def _leveldb_refusal(path: str | os.PathLike, what: str) -> CaffeError:
    return CaffeError(f"{what}'{path}' is a LevelDB (backend: LEVELDB); only LMDB is supported — convert it once "
                      "(e.g. read it with plyvel and write it with data_prep.lmdb_io.LMDBWriter, or rerun "
                      "convert_imageset with --backend lmdb) and set backend: LMDB")


def open_readonly(path: str | os.PathLike, what: str = "") -> lmdb.Environment:
    """Open an existing LMDB for reading; every way it can be absent or wrong is one CaffeError line.

    ``lock=False`` (Caffe's MDB_NOLOCK fallback) lets read-only folders and forked worker processes
    read without a lock file; the data must not be rewritten while it is being read.
    """
    p = Path(path)
    where = f"{what}: " if what else ""
    if not p.exists():
        rel = "" if p.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise CaffeError(f"{where}LMDB '{path}' does not exist{rel}")
    if p.is_dir() and not (p / "data.mdb").exists():
        if looks_like_leveldb(p):
            raise _leveldb_refusal(path, where)
        raise CaffeError(f"{where}'{path}' is not an LMDB (no data.mdb in it)")
    lmdb_check.verify(p, where)  # a truncated or damaged data.mdb: one line here, not a SIGBUS later
    try:
        return lmdb.open(str(p), readonly=True, lock=False, subdir=p.is_dir(), max_readers=2048)
    except lmdb.Error as e:
        raise CaffeError(f"{where}cannot open LMDB '{path}' ({e})") from None


class KeyList:
    """All keys of a DB in order, packed in two numpy arrays (cheap to fork, pickle and index)."""

    def __init__(self, keys: list[bytes]):
        lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.blob = b"".join(keys)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i]:self.offsets[i + 1]]


class LMDBReader:
    """Read-only access to a Caffe LMDB: count, keys in order, random and sequential reads."""

    def __init__(self, path: str | os.PathLike, what: str = ""):
        self.path = str(path)
        self.what = what
        self.env = open_readonly(path, what)
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> LMDBReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self.env.close()

    @property
    def txn(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.env.begin()
        return self._txn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """lmdb's own errors (a page of the wrong type, a page not found: a damaged file the size check and
        the verifying walk let through) as one CaffeError line naming the database."""
        try:
            yield
        except lmdb.Error as e:
            raise CaffeError(f"{self.what + ': ' if self.what else ''}LMDB '{self.path}': damaged ({e})") from None

    def __len__(self) -> int:
        with self._reading():
            return self.env.stat()["entries"]

    def keys(self) -> KeyList:
        with self._reading():
            return KeyList(list(self.txn.cursor().iternext(keys=True, values=False)))

    def get(self, key: bytes) -> bytes:
        return next(self.values([key]))

    def values(self, keys: Iterable[bytes]) -> Iterator[bytes]:
        """The values of ``keys`` in order, under one error context (a batch of MNIST pairs reads 250: a context
        per record cost a fifth of the data path), one at a time: a caller that decodes each before taking
        the next lets it go at once (60 KITTI pairs held together are 18.5 MB of fresh memory per batch)."""
        txn = self.txn
        with self._reading():
            for key in keys:
                value = txn.get(key)
                if value is None:
                    raise CaffeError(f"{self.what + ': ' if self.what else ''}LMDB '{self.path}' has no key "
                                     f"'{key.decode()}'")
                yield value

    def first(self) -> tuple[bytes, bytes]:
        with self._reading():
            cursor = self.txn.cursor()
            if not cursor.first():
                raise CaffeError(f"{self.what + ': ' if self.what else ''}LMDB '{self.path}' is empty")
            return cursor.key(), cursor.value()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) once, in key order."""
        with self._reading():
            yield from self.txn.cursor().iternext(keys=True, values=True)

    def stream(self, rank: int = 0, world_size: int = 1, skip: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """Caffe's DataLayer cursor: forever, in key order, wrapping with Caffe's log line.

        With ``skip`` (TRAIN) record ``offset`` is kept iff ``offset % world_size == rank``, the offset
        counting every record passed, across wraps (``DataLayer::Skip``/``Next``).
        """
        if len(self) == 0:
            self.first()  # raises "is empty"
        offset = 0
        with self._reading():
            cursor = self.txn.cursor()
            cursor.first()
            while True:
                if not skip or offset % world_size == rank:
                    yield cursor.key(), cursor.value()
                offset += 1
                if not cursor.next():
                    if rank == 0:
                        log.info(RESTART_MESSAGE)
                    cursor.first()


_SHARED: dict[tuple[int, str], list] = {}  # (pid, real path) -> [reader, users]


def acquire_reader(path: str | os.PathLike, what: str = "") -> LMDBReader:
    """A reader shared by every user of one database in this process (LMDB refuses to open an
    environment twice in a process); a forked worker gets its own. Give it back with release_reader."""
    key = (os.getpid(), os.path.realpath(path))
    entry = _SHARED.get(key)
    if entry is None:
        entry = _SHARED[key] = [LMDBReader(path, what), 0]
    entry[1] += 1
    return entry[0]


def release_reader(reader: LMDBReader) -> None:
    """Drop one use of a shared reader; the last one closes the environment."""
    key = (os.getpid(), os.path.realpath(reader.path))
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not reader:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _SHARED[key]
        reader.close()


def check_room(folder: str | os.PathLike, count: int, record_bytes: int, what: str) -> None:
    """Refuse up front a database that cannot fit: ``count`` records of ``record_bytes`` (with their
    8-byte keys and LMDB's 10-byte node headers, a lower bound: pages are rarely full) against the free
    space of the disk ``folder`` is on."""
    place = Path(folder).resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    need = count * (record_bytes + 8 + 10)
    if need > free:
        raise CaffeError(f"{what}: {count:,} records of {record_bytes:,} bytes need at least {need / 1e9:,.1f} GB, "
                         f"but the disk of {place} has {free / 1e9:,.1f} GB free")


class LMDBWriter:
    """Batched, crash-safe writer of a Caffe LMDB.

    ``mode``: ``"new"`` refuses an existing database (Caffe's ``db::NEW`` refuses an existing folder);
    ``"append"`` opens it (or creates it) and adds records — in this mode :meth:`put` of a key already
    there is skipped when ``skip_existing`` (resuming an interrupted run); ``"overwrite"`` deletes the LMDB files
    first. Puts are buffered and committed every ``commit_every`` records (and on close, also when an
    exception ends a ``with`` block: every buffered record is complete). A commit that does not fit the
    map doubles the map size and retries, so nothing like Caffe's old 1 TB sparse map is needed.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "new", commit_every: int = 1000,
                 map_size: int = 64 << 20, skip_existing: bool = True):
        if mode not in ("new", "append", "overwrite"):
            raise ValueError(f"mode must be new, append or overwrite, got {mode!r}")
        if commit_every < 1:
            raise CaffeError(f"commit_every must be positive, got {commit_every}")
        self.path = Path(path)
        self.commit_every = commit_every
        self.skip_existing = skip_existing and mode == "append"
        self._created = not (self.path / "data.mdb").exists() or mode == "overwrite"
        self._prepare(mode)
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True, sync=True, metasync=True,
                                 map_async=False, max_dbs=0)
        except lmdb.Error as e:
            raise CaffeError(f"cannot create LMDB '{path}' ({e})") from None
        mark = self.path / INCOMPLETE_MARK
        try:
            mark.write_text(f"{' '.join(sys.argv[:1] + sys.argv[1:])[:500]} (pid {os.getpid()}, "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        except OSError as e:
            self.env.close()
            raise CaffeError(f"cannot write into '{self.path}' ({e.strerror})") from None
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_keys: set[bytes] = set()
        self.written = 0  # records committed by this writer
        self.skipped = 0  # puts skipped because the key was already in the DB

    def _prepare(self, mode: str) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise CaffeError(f"'{p}' exists and is not a folder")
        if looks_like_leveldb(p):
            raise _leveldb_refusal(p, "")
        contents = {c.name for c in p.iterdir()} if p.is_dir() else set()
        if contents and mode == "new":
            raise CaffeError(f"'{p}' already exists; pass --append to add to it (resumes an interrupted run) or "
                             "--overwrite to rebuild it")
        if contents and mode == "append" and (p / "data.mdb").exists():
            lmdb_check.verify(p)
        if contents and mode == "overwrite":
            if not contents <= _LMDB_FILES:
                raise CaffeError(f"'{p}' holds files other than an LMDB's ({', '.join(sorted(contents - _LMDB_FILES))})"
                                 "; refusing to overwrite it")
            for name in contents:
                (p / name).unlink()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CaffeError(f"cannot create '{p}' ({e.strerror})") from None

    def __enter__(self) -> LMDBWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(finished=exc_type is None)

    def __contains__(self, key: bytes) -> bool:
        if key in self._pending_keys:
            return True
        with self.env.begin() as txn:
            return txn.get(key) is not None

    def __len__(self) -> int:
        return self.env.stat()["entries"] + len(self._pending)

    def put(self, key: bytes | str, value: bytes) -> bool:
        """Buffer one record (committed with the next batch); False when skipped as already present."""
        key = key.encode() if isinstance(key, str) else bytes(key)
        if not key or len(key) > self.env.max_key_size():
            raise CaffeError(f"LMDB key must be 1..{self.env.max_key_size()} bytes, got {len(key)}: {key[:60]!r}")
        if self.skip_existing and key in self:
            self.skipped += 1
            return False
        self._pending.append((key, bytes(value)))
        self._pending_keys.add(key)
        if len(self._pending) >= self.commit_every:
            self.commit()
        return True

    def commit(self) -> None:
        """Write the buffered records in one transaction, growing the map until they fit."""
        if not self._pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                new_size = self.env.info()["map_size"] * 2
                log.info("Doubling LMDB map size to %d MB", new_size >> 20)
                self.env.set_mapsize(new_size)
            except lmdb.Error as e:  # a failed commit leaves the DB as of the last commit (LMDB's own guarantee)
                entries = self.env.stat()["entries"]
                self._pending.clear()
                self._pending_keys.clear()
                kept = f"the {entries:,} records committed are kept: free space, then rerun with --append to finish"
                if entries == 0 and self._created:  # close() removes it (the rule lives there)
                    kept = "nothing was committed, so the new database was removed"
                raise LMDBWriteError(f"writing LMDB '{self.path}' failed ({e}): disk full or file size limit "
                                     f"reached? {kept}", entries) from None
        self.written += len(self._pending)
        self._pending.clear()
        self._pending_keys.clear()

    def close(self, finished: bool = True) -> None:
        """Commit what is buffered; ``finished`` (a ``with`` block that ended without an exception) also
        removes the incomplete-marker: the database now holds everything it was meant to."""
        if self.env is None:
            return
        try:
            self.commit()
            if finished:
                (self.path / INCOMPLETE_MARK).unlink(missing_ok=True)
        except BaseException:
            finished = False
            raise
        finally:
            # a new database that got nothing before a failure (here or in the block) is not left behind
            remove = not finished and self._created and self.env.stat()["entries"] == 0
            self.env.close()
            self.env = None
            if remove:
                shutil.rmtree(self.path, ignore_errors=True)
