"""Faults from outside: SIGKILL at random points (and at the worst ones) while writing an LMDB, training
and exporting, and a full disk (RLIMIT_FSIZE in the child: writes past the limit fail with EFBIG, as on a
full disk; or a real 256 kB tmpfs where one can be mounted).

After a kill every file is complete and valid, or absent (a temporary ``.<name>.*.partial`` may remain,
never under the final name), and a rerun / ``--append`` / ``--snapshot`` resume ends equal to an
uninterrupted run — bit for bit for training on CPU. A full disk is one error line, exit code 2, and
loses nothing committed before.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from converter import caffe_pb2
from converter.io import blob_to_array, read_binary, read_solver
from data_prep.imageset import convert_imageset
from data_prep.lmdb_io import LMDBReader
from runner.train import TrainOptions, run
from tests.test_train_cli import DATA, ROOT, one_thread, weights_of, write_case  # noqa: F401 - one_thread: fixture

SEED = int(os.environ.get("FAULTS_SEED", "20261129"))
COMMIT_EVERY = 50
LENET = ROOT.parent / "shared" / "data" / "caffe_models" / "lenet_mnist"

# The CLI with smaller LMDB transactions (convert_imageset commits every 1000 records, too few for kills
# to land between commits on a small list) and, through EGO_FAULT, a SIGKILL of itself at one exact
# place: os.replace onto a final name (a temporary file complete, not yet renamed) or write_message of a
# file (the .caffemodel of a snapshot written, its .solverstate not).
_CLI = """
import os, signal, sys
from data_prep import imageset
_convert = imageset.convert_imageset
imageset.convert_imageset = lambda *a, **k: _convert(*a, **{**k, "commit_every": COMMIT_EVERY})
fault = os.environ.get("EGO_FAULT", "")
if fault:
    where, _, name = fault.partition(":")
    import converter.io as cio
    if where == "replace":
        _replace = cio.os.replace
        class _Os:
            def __getattr__(self, attr):
                return getattr(os, attr)
            def replace(self, src, dst):
                if str(dst).endswith(name):
                    os.kill(os.getpid(), signal.SIGKILL)
                _replace(src, dst)
        cio.os = _Os()
    elif where == "write_message":
        import runner.train as rt
        _write = rt.write_message
        def write_message(path, *a, **k):
            if str(path).endswith(name):
                os.kill(os.getpid(), signal.SIGKILL)
            _write(path, *a, **k)
        rt.write_message = write_message
from runner.cli import main
sys.exit(main(sys.argv[1:]))
""".replace("COMMIT_EVERY", str(COMMIT_EVERY))


def _env(**extra) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _file_size_limit(nbytes: int):
    """preexec_fn: a file may not grow past ``nbytes`` (EFBIG instead of the default SIGXFSZ kill)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def cli_run(*args: str, fault: str = "", limit: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI, *args], cwd=ROOT, env=_env(EGO_FAULT=fault),
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_file_size_limit(limit) if limit else None)


def cli_kill_after(args: list[str], started: Path | None, delay: float, timeout: float = 120) -> bool:
    """Start the CLI, wait for ``started`` to exist (if given), then SIGKILL it ``delay`` s later; False if it
    had ended by then."""
    proc = subprocess.Popen([sys.executable, "-c", _CLI, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while started is not None and time.time() < deadline and proc.poll() is None and not started.exists():
        time.sleep(0.002)
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def one_error_line(proc: subprocess.CompletedProcess, verb: str) -> str:
    """The CLI's closing error: exit code 2 and one line (a training log may precede it on stderr)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"egomotion {verb}: error: "), proc.stderr[-3000:]
    return last


def no_partial_under_final_names(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.name.endswith(".partial"):
            assert p.name.startswith("."), f"temporary file not hidden: {p}"


# ------------------------------------------------------------------------------------------------
# LMDB: convert-imageset
# ------------------------------------------------------------------------------------------------
N_IMAGES = 1500


@pytest.fixture(scope="module")
def imageset(tmp_path_factory):
    """1500 small PNGs, their list, and the records of an uninterrupted conversion (key order)."""
    folder = tmp_path_factory.mktemp("imageset")
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    lines = []
    for i in range(N_IMAGES):
        cv2.imwrite(str(folder / "img" / f"{i:04d}.png"), rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
        lines.append(f"{i:04d}.png {i % 10}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    convert_imageset(str(folder / "img") + "/", folder / "list.txt", folder / "reference", threads=1)
    seconds = time.perf_counter() - start
    with LMDBReader(folder / "reference") as r:
        reference = list(r.items())
    assert len(reference) == N_IMAGES
    return folder, reference, seconds


def _convert_args(folder: Path, db: Path, *flags: str) -> list[str]:
    return ["data", "convert-imageset", *flags, str(folder / "img") + "/", str(folder / "list.txt"), str(db)]


def _committed_prefix(db: Path, reference: list) -> int:
    """The DB opens and holds exactly the first n reference records, n a multiple of the commit size."""
    with LMDBReader(db) as r:
        items = list(r.items())
    assert items == reference[:len(items)]
    assert len(items) % COMMIT_EVERY == 0 or len(items) == len(reference)
    return len(items)


@pytest.mark.parametrize("k", range(3))
def test_lmdb_sigkill_at_random_points_then_append_equals_uninterrupted(tmp_path, imageset, k):
    folder, reference, seconds = imageset
    db = tmp_path / "db"
    delay = random.Random(SEED + k).uniform(0.0, seconds)  # the conversion takes about as long in the child
    cli_kill_after(_convert_args(folder, db), db / "data.mdb", delay)
    committed = _committed_prefix(db, reference)
    print(f"killed {delay:.3f} s after data.mdb appeared: {committed} of {len(reference)} records committed")
    if committed < len(reference):  # `data inspect` says the killed database is incomplete
        assert "INCOMPLETE: the writer" in cli_run("data", "inspect", str(db)).stdout
    again = cli_run(*_convert_args(folder, db, "--append"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"({committed} already in the DB)" in again.stdout or committed == 0
    with LMDBReader(db) as r:
        assert list(r.items()) == reference
    assert "INCOMPLETE" not in cli_run("data", "inspect", str(db)).stdout  # finished by --append


def test_lmdb_disk_full_is_one_line_and_keeps_what_was_committed(tmp_path, imageset):
    folder, reference, _ = imageset
    db = tmp_path / "db"
    first = tmp_path / "first.txt"  # a first run commits 300 records
    first.write_text("".join((folder / "list.txt").read_text().splitlines(keepends=True)[:300]))
    done = cli_run("data", "convert-imageset", str(folder / "img") + "/", str(first), str(db))
    assert done.returncode == 0, done.stderr
    before = _committed_prefix(db, reference)
    assert before == 300
    size = (db / "data.mdb").stat().st_size
    full = cli_run(*_convert_args(folder, db, "--append"), limit=size + 200_000)
    line = one_error_line(full, "data")
    assert f"writing LMDB '{db}' failed" in line and "disk full" in line
    assert _committed_prefix(db, reference) >= before  # nothing committed lost, the DB still opens
    again = cli_run(*_convert_args(folder, db, "--append"))
    assert again.returncode == 0, again.stderr[-2000:]
    with LMDBReader(db) as r:
        assert list(r.items()) == reference


def test_first_conversion_stopped_by_the_machine_keeps_its_prefix(tmp_path, imageset):
    """Bad input removes a new DB; a disk-full or file-size stop does not: it names what it kept and
    --append finishes the job."""
    folder, reference, _ = imageset
    db = tmp_path / "db"
    full = cli_run(*_convert_args(folder, db), limit=400_000)
    line = one_error_line(full, "data")
    kept = _committed_prefix(db, reference)
    assert 0 < kept < len(reference)
    assert "disk full" in line and f"the {kept} records committed are kept" in line and "--append" in line
    again = cli_run(*_convert_args(folder, db, "--append"))
    assert again.returncode == 0, again.stderr[-2000:]
    with LMDBReader(db) as r:
        assert list(r.items()) == reference


# ------------------------------------------------------------------------------------------------
# Training snapshots
# ------------------------------------------------------------------------------------------------
MAX_ITER = 40


def _iter_of(path: Path) -> int:
    return int(re.search(r"_iter_(\d+)", path.name)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """LeNet (dropout, mirroring) trained to MAX_ITER without interruption, in this process, one thread."""
    if not DATA.is_dir():
        pytest.skip("golden _data is absent")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = write_case(tmp_path_factory.mktemp("full"), max_iter=MAX_ITER)
        run(read_solver(full), str(full), TrainOptions(progress=False))
    finally:
        torch.set_num_threads(before)
    return full.parent


def check_snapshots(folder: Path) -> Path | None:
    """Every snapshot file is complete and valid; the last .solverstate whose weights are there, if any."""
    no_partial_under_final_names(folder)
    for model in folder.glob("*.caffemodel"):
        assert weights_of(model), model
    states = sorted(folder.glob("*.solverstate"), key=_iter_of)
    for state in states:
        st = read_binary(state, caffe_pb2.SolverState())
        assert st.iter == _iter_of(state) and Path(st.learned_net).is_file()
        for blob in st.history:
            blob_to_array(blob)
    return states[-1] if states else None


def finish_and_compare(case: Path, reference: Path) -> None:
    """Resume from the last complete .solverstate (or rerun from scratch) and compare with the reference."""
    state = check_snapshots(case)
    resume = ["--snapshot", str(state)] if state else []
    done = cli_run("train", "--solver", str(case / "solver.prototxt"), *resume)
    assert done.returncode == 0, done.stderr[-2000:]
    last = f"lenet_iter_{MAX_ITER}"
    for a, b in zip(weights_of(reference / f"{last}.caffemodel"), weights_of(case / f"{last}.caffemodel"), strict=True):
        assert np.array_equal(a, b)
    sa = read_binary(reference / f"{last}.solverstate", caffe_pb2.SolverState())
    sb = read_binary(case / f"{last}.solverstate", caffe_pb2.SolverState())
    assert sa.iter == sb.iter == MAX_ITER
    for a, b in zip(sa.history, sb.history, strict=True):
        assert np.array_equal(blob_to_array(a), blob_to_array(b))


@pytest.mark.parametrize("k", range(2))
def test_train_sigkill_at_a_random_point_then_resume_is_bit_identical(tmp_path, uninterrupted, k):
    case = write_case(tmp_path / "cut", max_iter=MAX_ITER).parent
    delay = random.Random(SEED + 100 + k).uniform(0.0, 0.5)
    cli_kill_after(["train", "--solver", str(case / "solver.prototxt")], case / "lenet_iter_10.caffemodel", delay)
    print(f"killed {delay:.3f} s after the first snapshot: {sorted(p.name for p in case.glob('*_iter_*'))}")
    finish_and_compare(case, uninterrupted)


@pytest.mark.parametrize("fault", ["write_message:_iter_20.solverstate", "replace:_iter_20.caffemodel",
                                   "replace:_iter_20.solverstate"])
def test_train_sigkill_inside_a_snapshot_then_resume_is_bit_identical(tmp_path, uninterrupted, fault):
    """Killed after the .caffemodel and before the .solverstate, and with either file complete in its
    temporary but not yet renamed: iteration 20's snapshot is incomplete, resume from iteration 10's."""
    case = write_case(tmp_path / "cut", max_iter=MAX_ITER).parent
    killed = cli_run("train", "--solver", str(case / "solver.prototxt"), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (case / "lenet_iter_20.solverstate").exists()
    assert check_snapshots(case).name == "lenet_iter_10.solverstate"
    if fault.startswith("replace:"):
        assert list(case.glob(".lenet_iter_20.*.partial")), "the killed write leaves its marked temporary"
    finish_and_compare(case, uninterrupted)
    assert not list(case.glob(".*.partial")), "resuming removes the killed run's temporaries"


def test_train_disk_full_is_one_line_and_keeps_earlier_snapshots(tmp_path):
    if not DATA.is_dir():
        pytest.skip("golden _data is absent")
    case = write_case(tmp_path / "case", max_iter=10).parent
    first = cli_run("train", "--solver", str(case / "solver.prototxt"))
    assert first.returncode == 0, first.stderr[-2000:]
    kept = {p.name: p.read_bytes() for p in case.glob("lenet_iter_10.*")}
    assert len(kept) == 2
    solver = case / "solver.prototxt"
    solver.write_text(solver.read_text().replace("max_iter: 10", f"max_iter: {MAX_ITER}"))
    limit = len(kept["lenet_iter_10.caffemodel"]) // 2  # the next .caffemodel cannot be written
    full = cli_run("train", "--solver", str(solver), "--snapshot", str(case / "lenet_iter_10.solverstate"), limit=limit)
    line = one_error_line(full, "train")
    assert "lenet_iter_20.caffemodel: cannot write (File too large)" in line
    assert {p.name: p.read_bytes() for p in case.glob("lenet_iter_10.*")} == kept
    assert not list(case.glob("lenet_iter_20.*")) and not list(case.glob(".*.partial"))


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def _export_args(out: Path) -> list[str]:
    return ["export", "--model", str(LENET / "lenet.prototxt"), "--weights", str(LENET / "lenet_iter_10000.caffemodel"),
            "-o", str(out)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not LENET.is_dir():
        pytest.skip("the real LeNet is absent")
    out = tmp_path_factory.mktemp("export") / "lenet.onnx"
    start = time.perf_counter()
    done = cli_run(*_export_args(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out.read_bytes(), time.perf_counter() - start


def _absent_or_complete(out: Path, reference: bytes) -> None:
    no_partial_under_final_names(out.parent)
    if out.exists():
        data = out.read_bytes()
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        assert data == reference


def test_export_sigkill_at_a_random_point_leaves_no_or_a_complete_onnx(tmp_path, exported):
    exported, seconds = exported
    out = tmp_path / "lenet.onnx"
    delay = random.Random(SEED + 200).uniform(0.0, seconds)
    alive = cli_kill_after(_export_args(out), None, delay)
    print(f"killed {delay:.3f} s after the start ({'running' if alive else 'had ended'}): .onnx there: {out.exists()}")
    _absent_or_complete(out, exported)
    killed = cli_run(*_export_args(out), fault="replace:lenet.onnx")  # complete temporary, not yet renamed
    assert killed.returncode == -signal.SIGKILL
    _absent_or_complete(out, exported)
    again = cli_run(*_export_args(out))
    assert again.returncode == 0 and out.read_bytes() == exported


def test_export_disk_full_is_one_line_and_leaves_nothing(tmp_path, exported):
    exported, _ = exported
    out = tmp_path / "lenet.onnx"
    full = cli_run(*_export_args(out), limit=len(exported) // 2)
    line = one_error_line(full, "export")
    assert f"{out}: cannot write (File too large)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# A real full disk: a 256 kB tmpfs (root and mount rights needed; skipped otherwise)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_lmdb_and_snapshot(tiny_disk, imageset):
    folder, reference, _ = imageset
    db = tiny_disk / "db"
    case = write_case(tiny_disk / "train", max_iter=10).parent if DATA.is_dir() else None
    first = tiny_disk / "first.txt"
    first.write_text("".join((folder / "list.txt").read_text().splitlines(keepends=True)[:100]))
    done = cli_run("data", "convert-imageset", str(folder / "img") + "/", str(first), str(db))
    assert done.returncode == 0, done.stderr
    full = cli_run(*_convert_args(folder, db, "--append"))  # 1500 records of ~400 bytes: more than 256 kB
    assert "disk full" in one_error_line(full, "data")
    committed = _committed_prefix(db, reference)
    assert committed >= 100
    if case is not None:  # the disk is full now: the log cannot be written, nor a 1.7 MB .caffemodel
        train = cli_run("train", "--solver", str(case / "solver.prototxt"))
        assert "No space left on device" in one_error_line(train, "train")
        assert not list(case.glob("*.caffemodel")) and not list(case.glob(".*.partial"))
    assert _committed_prefix(db, reference) == committed


def test_mnist_labeled_under_a_file_size_limit_leaves_nothing_and_says_so(tmp_path):
    """A new digit LMDB that cannot commit a single transaction under `ulimit -f` is removed, and the one
    line says so (it used to leave an empty database and say nothing about it)."""
    from tests.test_mnist import mnist_dir

    db = tmp_path / "digits"
    full = cli_run("data", "mnist-labeled", "--mnist-dir", str(mnist_dir()), "--count", "1000", str(db),
                   limit=64 * 1024)
    line = one_error_line(full, "data")
    assert f"writing LMDB '{db}' failed" in line and "nothing was committed, so the new database was removed" in line
    assert not db.exists()
