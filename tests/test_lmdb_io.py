"""LMDB writer (batched, growing, crash-safe, resumable) and reader (key order, wrap, rank skip)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from converter.errors import CaffeError
from data_prep.lmdb_io import (
    RESTART_MESSAGE,
    LMDBReader,
    LMDBWriter,
    acquire_reader,
    caffe_key,
    release_reader,
)
from tests.golden import require_golden

ROOT = Path(__file__).resolve().parents[1]


def _write(db, n, mode="new", **kw) -> LMDBWriter:
    with LMDBWriter(db, mode=mode, **kw) as w:
        for i in range(n):
            w.put(caffe_key(i, f"img{i}.png"), f"value {i}".encode() * 10)
    return w


def test_caffe_key_format():
    assert caffe_key(42, "n01440764/x.JPEG") == b"00000042_n01440764/x.JPEG"
    assert caffe_key(7) == b"00000007"
    assert caffe_key(123456789, "a") == b"123456789_a"


def test_round_trip_in_key_order(tmp_path):
    db = tmp_path / "db"
    with LMDBWriter(db, commit_every=3) as w:
        for key in (b"b", b"a", b"c", b"aa"):
            w.put(key, key * 2)
    with LMDBReader(db) as r:
        assert len(r) == 4
        assert [k for k, _ in r.items()] == [b"a", b"aa", b"b", b"c"]  # lexicographic, as Caffe's cursor
        keys = r.keys()
        assert [keys[i] for i in range(len(keys))] == [b"a", b"aa", b"b", b"c"]
        assert r.get(b"aa") == b"aaaa"
        assert r.first() == (b"a", b"aa")
        with pytest.raises(CaffeError, match="no key 'zz'"):
            r.get(b"zz")


def test_map_grows_instead_of_failing(tmp_path):
    db = tmp_path / "db"
    with LMDBWriter(db, map_size=32 << 10, commit_every=50) as w:
        for i in range(200):
            w.put(caffe_key(i), os.urandom(20_000))
        size = w.env.info()["map_size"]
    assert size >= 200 * 20_000
    with LMDBReader(db) as r:
        assert len(r) == 200


def test_new_refuses_existing_append_resumes_overwrite_rebuilds(tmp_path):
    db = tmp_path / "db"
    _write(db, 5)
    with pytest.raises(CaffeError, match="already exists.*--append.*--overwrite"):
        LMDBWriter(db)
    w = _write(db, 8, mode="append")
    assert (w.written, w.skipped) == (3, 5)
    with LMDBReader(db) as r:
        assert len(r) == 8
    _write(db, 2, mode="overwrite")
    with LMDBReader(db) as r:
        assert len(r) == 2
    (db / "notes.txt").write_text("mine")
    with pytest.raises(CaffeError, match="notes.txt.*refusing"):
        LMDBWriter(db, mode="overwrite")


def test_missing_and_foreign_databases_are_one_line_errors(tmp_path):
    with pytest.raises(CaffeError, match="layer 'd'.*LMDB 'nope' does not exist.*working directory"):
        LMDBReader("nope", "layer 'd'")
    leveldb = tmp_path / "ldb"
    leveldb.mkdir()
    (leveldb / "CURRENT").write_text("MANIFEST-000001\n")
    (leveldb / "000003.log").write_bytes(b"")
    with pytest.raises(CaffeError, match="LevelDB.*convert"):
        LMDBReader(leveldb)
    with pytest.raises(CaffeError, match="LevelDB"):
        LMDBWriter(leveldb, mode="append")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaffeError, match="not an LMDB"):
        LMDBReader(empty)


def test_reads_caffes_read_only_lmdb():
    db = require_golden() / "_data" / "mnist_train_lmdb"
    with LMDBReader(db) as r:
        assert len(r) == 640
        assert r.first()[0] == b"00000000_train/00000.png"


def test_stream_wraps_with_caffes_log_line(tmp_path, caplog):
    db = tmp_path / "db"
    _write(db, 5)
    with LMDBReader(db) as r, caplog.at_level(logging.INFO, logger="data_prep.lmdb_io"):
        stream = r.stream()
        got = [next(stream)[0] for _ in range(12)]
        assert got == [caffe_key(i % 5, f"img{i % 5}.png") for i in range(12)]
        assert [rec.message for rec in caplog.records].count(RESTART_MESSAGE) == 2


def test_stream_rank_skip_counts_offsets_across_wraps(tmp_path):
    """DataLayer::Skip keeps offset % solver_count == rank, the offset running on across wraps: with
    5 records and 2 ranks rank 0 reads 0 2 4 1 3 0 ..., rank 1 reads 1 3 0 2 4 1 ..."""
    db = tmp_path / "db"
    _write(db, 5)
    with LMDBReader(db) as r:
        for rank, expected in ((0, [0, 2, 4, 1, 3, 0]), (1, [1, 3, 0, 2, 4, 1])):
            stream = r.stream(rank=rank, world_size=2)
            assert [next(stream)[0] for _ in range(6)] == [caffe_key(i, f"img{i}.png") for i in expected]
        stream = r.stream(rank=1, world_size=2, skip=False)  # TEST nets do not skip
        assert [next(stream)[0] for _ in range(2)] == [caffe_key(0, "img0.png"), caffe_key(1, "img1.png")]


def test_shared_reader_is_one_environment_per_process(tmp_path):
    db = tmp_path / "db"
    _write(db, 2)
    a = acquire_reader(db)
    b = acquire_reader(str(db) + "/")
    assert a is b
    release_reader(a)
    assert len(b) == 2  # still open for the second user
    release_reader(b)
    LMDBWriter(db, mode="append").close()  # closed: a writer may open it again


_WRITER = textwrap.dedent("""
    import sys
    from data_prep.lmdb_io import LMDBWriter, caffe_key
    db, n, every, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    w = LMDBWriter(db, mode=mode, commit_every=every, map_size=1 << 16)
    for i in range(n):
        w.put(caffe_key(i, "x"), bytes([i % 251]) * 3000)
        if (i + 1) % every == 0:
            print(i + 1, flush=True)
    w.close()
    print("done", flush=True)
""")


def _spawn(db, n, every, mode):
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(db), str(n), str(every), mode],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kill_after", [1, 7])
def test_kill_9_mid_write_leaves_a_committed_prefix_and_append_resumes(tmp_path, kill_after):
    db, n, every = tmp_path / "db", 1200, 20
    proc = _spawn(db, n, every, "new")
    for _ in range(kill_after):  # wait for some commits, then kill while it keeps writing (and growing the map)
        assert proc.stdout.readline().strip()
    time.sleep(0.003 * kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with LMDBReader(db) as r:
        items = list(r.items())
    assert len(items) >= kill_after * every and len(items) % every == 0
    assert [k for k, _ in items] == sorted(caffe_key(i, "x") for i in range(len(items)))
    assert all(v == bytes([int(k[:8]) % 251]) * 3000 for k, v in items)
    if len(items) == n:
        return  # it finished before the kill: nothing to resume
    proc = _spawn(db, n, every, "append")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip().endswith("done")
    with LMDBReader(db) as r:
        assert len(r) == n


def test_meta_pages_read_as_lmdb_reads_them(tmp_path):
    """data_prep.lmdb_check parses LMDB's meta pages itself (to refuse truncated files before lmdb maps them):
    its page size, last page and record count agree with what the lmdb library reports, and a file cut
    short of its last page is refused with both sizes named."""
    import lmdb

    from data_prep.lmdb_check import read_meta

    with LMDBWriter(tmp_path / "db", commit_every=7) as w:
        for i in range(50):
            w.put(caffe_key(i), bytes(300 + i))
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    stat, info = env.stat(), env.info()
    env.close()
    meta = read_meta(tmp_path / "db" / "data.mdb")
    assert (meta.page_size, meta.last_page, meta.entries) == (stat["psize"], info["last_pgno"], 50)
    data = (tmp_path / "db" / "data.mdb").read_bytes()
    (tmp_path / "db" / "data.mdb").write_bytes(data[:meta.needed_bytes - meta.page_size])
    with pytest.raises(CaffeError, match=rf"truncated: {meta.needed_bytes - meta.page_size:,} bytes, but its "
                                         rf"header says {meta.needed_bytes:,}"):
        LMDBReader(tmp_path / "db")
