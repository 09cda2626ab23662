"""Damaged LMDB files refused with one line instead of killing the process.

LMDB memory-maps ``data.mdb`` and trusts it: a truncated file (an interrupted copy, a full disk) makes the
first read past its end a SIGBUS, and a flipped bit in a node header can send a read anywhere in the map.
Neither reaches Python as an exception, so two checks run before a database is first read:

1. **The header** (cheap, always): LMDB keeps two meta pages at the start of the file (``MDB_meta`` in
   ``mdb.c``: magic ``0xBEEFC0DE``, format version 1, the page size in ``mm_dbs[FREE_DBI].md_pad``, the last
   page in use and a transaction id). The newer valid one says how many pages the data needs; a file shorter
   than that is truncated.
2. **A walk in a forked child** (once per file version, remembered in this process and, for databases of
   64 MiB and more, in a small cache folder): the child opens the database and touches the last byte of
   every key and value, as a reader will. If it dies of a signal, or does not finish, the parent refuses
   the database and names the record the walk last reached; the parent's own reads are then the same
   reads that already succeeded.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from converter.errors import CaffeError

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_HEADER = 16  # MDB_page: mp_pgno (8), mp_pad, mp_flags, mp_lower, mp_upper (2 each)
# Offsets inside MDB_meta (64-bit build): magic, version, address, mapsize, two MDB_db of 48 bytes, last_pg,
# txnid. The page size is the free DB's md_pad (the first field of mm_dbs[0]); md_entries of the main DB.
_META = struct.Struct("<IIQQI")  # magic, version, address, mapsize, psize
_LAST_PG, _TXNID, _ENTRIES = 120, 128, 104


@dataclass(frozen=True)
class Meta:
    page_size: int
    last_page: int
    txnid: int
    entries: int

    @property
    def needed_bytes(self) -> int:
        return (self.last_page + 1) * self.page_size


def _meta_at(head: bytes, offset: int) -> Meta | None:
    base = offset + PAGE_HEADER
    if len(head) < base + _TXNID + 8:
        return None
    magic, version, _, _, psize = _META.unpack_from(head, base)
    if magic != MAGIC or version != DATA_VERSION or psize < 512 or psize > 65536 or psize & (psize - 1):
        return None
    last_pg, = struct.unpack_from("<Q", head, base + _LAST_PG)
    txnid, = struct.unpack_from("<Q", head, base + _TXNID)
    entries, = struct.unpack_from("<Q", head, base + _ENTRIES)
    return Meta(psize, last_pg, txnid, entries)


def read_meta(data_file: Path, where: str = "") -> Meta:
    """The newer of the two meta pages of ``data_file``; a CaffeError when neither is valid or the file
    is shorter than the pages they say are in use."""
    size = data_file.stat().st_size
    with open(data_file, "rb") as f:
        head = f.read(2 * 65536)
    first = _meta_at(head, 0)
    metas = [m for m in (first, _meta_at(head, first.page_size) if first else None) if m is not None]
    if not metas:
        raise CaffeError(f"{where}{data_file}: not an LMDB data file (no valid meta page: "
                         f"{size:,} bytes{', empty' if size == 0 else ''})")
    meta = max(metas, key=lambda m: m.txnid)
    if size < meta.needed_bytes:
        raise CaffeError(f"{where}{data_file}: truncated: {size:,} bytes, but its header says "
                         f"{meta.needed_bytes:,} ({meta.last_page + 1:,} pages of {meta.page_size}) hold its "
                         f"{meta.entries:,} records (an interrupted copy or a full disk?)")
    return meta


_VERIFIED: set[tuple] = set()


def _version(data_file: Path, meta: Meta) -> tuple:
    st = data_file.stat()
    return (str(data_file.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, meta.txnid)


CACHE_MIN_BYTES = 64 << 20
"""Smaller databases are walked again in each process (milliseconds: a 250 MB one took 50 ms warm) rather than
leave a cache file each; larger ones are remembered on disk."""
CACHE_ROOT: Path | None = None
"""Where verdicts are remembered across processes (None: ``$XDG_CACHE_HOME/egomotion/lmdb-verified``)."""


def _cache_file(version: tuple) -> Path:
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = CACHE_ROOT or home_cache / "egomotion" / "lmdb-verified"
    return root / hashlib.sha256(repr(version).encode()).hexdigest()[:32]


def _walk(path: Path, subdir: bool, report: int) -> None:
    """In the child: every key and value touched; the count reached written to ``report`` every record."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=subdir, max_readers=2048)
    with env.begin(buffers=True) as txn:
        count = 0
        for key, value in txn.cursor().iternext(keys=True, values=True):
            _ = key[len(key) - 1] if len(key) else 0
            _ = value[len(value) - 1] if len(value) else 0
            count += 1
            if count % 256 == 0:
                os.write(report, struct.pack("<Q", count))
        os.write(report, struct.pack("<Q", count))


def _walk_in_child(path: Path, subdir: bool, timeout: float) -> tuple[str | None, int, bool]:
    """(why the walk crashed or None, records walked, whether it read everything without an lmdb error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            # lmdb's failed assertions (abort) and faulthandler would print here: the parent says what happened
            import faulthandler

            faulthandler.disable()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(read_end)
            _walk(path, subdir, write_end)
        except BaseException:  # noqa: BLE001 - the parent reads the database and reports the lmdb error itself
            code = 3
        os._exit(code)
    os.close(write_end)
    os.set_blocking(read_end, False)
    reached, chunks = 0, b""
    deadline = time.monotonic() + timeout
    status = None
    while status is None:
        try:
            chunks += os.read(read_end, 1 << 16)
        except BlockingIOError:
            pass
        done, status_code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_code
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
        else:
            time.sleep(0.002)
    try:
        chunks += os.read(read_end, 1 << 20)
    except BlockingIOError:
        pass
    os.close(read_end)
    if len(chunks) >= 8:
        reached, = struct.unpack_from("<Q", chunks, (len(chunks) // 8 - 1) * 8)
    if status == -1:
        return f"reading it did not finish in {timeout:.0f} s (a loop in its pages?)", reached, False
    if os.WIFSIGNALED(status):
        return f"reading it crashes ({signal.Signals(os.WTERMSIG(status)).name})", reached, False
    return None, reached, os.WEXITSTATUS(status) == 0


def verify(path: Path, where: str = "") -> Meta:
    """Refuse a damaged LMDB (folder or single file ``path``) with one line before anything reads it."""
    subdir = path.is_dir()
    data_file = path / "data.mdb" if subdir else path
    meta = read_meta(data_file, where)
    version = _version(data_file, meta)
    if version in _VERIFIED:
        return meta
    cache = _cache_file(version)
    if not cache.exists():
        # generous: a healthy walk reads at disk speed (100 MB/s covers a cold spinning disk)
        timeout = 30 + data_file.stat().st_size / 100e6
        why, reached, clean = _walk_in_child(path, subdir, timeout)
        if why is not None:
            raise CaffeError(f"{where}{data_file}: damaged: {why} after {reached:,} of its {meta.entries:,} "
                             f"records")
        if not clean:
            return meta  # lmdb itself refuses it: the caller's own read reports lmdb's error
        if data_file.stat().st_size < CACHE_MIN_BYTES:
            _VERIFIED.add(version)
            return meta
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(f"{version}\n")
        except OSError:
            pass  # a read-only home: the walk runs again next time
    _VERIFIED.add(version)
    return meta
