"""convert_imageset / compute_image_mean against Caffe's own tools (golden) and real images; the CLI."""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from converter.errors import CaffeError
from converter.io import read_blobproto
from data_prep.datum import datum_to_array, parse_datum
from data_prep.imageset import compute_image_mean, convert_imageset, read_list
from data_prep.lmdb_io import LMDBReader
from runner.data_cli import add_data_parser, run_data
from tests.golden import REFERENCE, require_golden

DATA = REFERENCE.parent / "data"


def _items(db) -> list[tuple[bytes, bytes]]:
    with LMDBReader(db) as r:
        return list(r.items())


@pytest.mark.parametrize("case, listfile, ours_kw, theirs", [
    ("lmdb_formats", "list_mnist.txt", {"gray": True}, "mnist_raw_lmdb"),
    ("lmdb_formats", "list_mnist.txt", {"gray": True, "encoded": True, "encode_type": "png"}, "mnist_png_lmdb"),
    ("lmdb_formats", "list_jpeg.txt", {"encoded": True}, "jpeg_lmdb"),
    ("transformer", "list.txt", {"resize_height": 64, "resize_width": 64}, "sun6_lmdb"),
])
def test_convert_imageset_writes_caffes_records_byte_for_byte(tmp_path, monkeypatch, case, listfile, ours_kw, theirs):
    folder = require_golden() / case
    monkeypatch.chdir(folder)  # Caffe ran with ./ as ROOTFOLDER inside the case folder
    counts = convert_imageset("./", listfile, tmp_path / "db", **ours_kw)
    ours, caffes = _items(tmp_path / "db"), _items(theirs)
    assert counts["written"] == len(caffes)
    assert [k for k, _ in ours] == [k for k, _ in caffes]  # %08d_<path as listed>
    assert [v for _, v in ours] == [v for _, v in caffes]


def test_compute_image_mean_equals_caffes_binaryproto(tmp_path):
    case = require_golden() / "transformer"
    mean, channels = compute_image_mean(case / "sun6_lmdb", tmp_path / "mean.binaryproto")
    caffe_mean = read_blobproto(case / "mean.binaryproto")
    np.testing.assert_array_equal(mean, caffe_mean)
    assert (tmp_path / "mean.binaryproto").read_bytes() == (case / "mean.binaryproto").read_bytes()
    images = np.load(case / "decoded" / "images.npy").astype(np.float64)
    np.testing.assert_allclose(mean[0], images.mean(0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(channels, images.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_compute_image_mean_of_encoded_lmdb_decodes_natively(tmp_path):
    case = require_golden() / "lmdb_formats"
    mean, _ = compute_image_mean(case / "mnist_png_lmdb")
    images = np.load(case / "decoded" / "mnist_png_lmdb" / "images.npy").astype(np.float64)
    np.testing.assert_allclose(mean[0], images.mean(0), atol=1e-4)


def _mnist_pngs(folder: Path, n: int) -> list[tuple[np.ndarray, int]]:
    """The first n MNIST training digits from the IDX files, written as 8-bit PNGs train/00000.png ..."""
    with gzip.open(DATA / "mnist" / "train-images-idx3-ubyte.gz") as f:
        f.read(16)
        pixels = np.frombuffer(f.read(n * 784), np.uint8).reshape(n, 28, 28)
    with gzip.open(DATA / "mnist" / "train-labels-idx1-ubyte.gz") as f:
        f.read(8)
        labels = np.frombuffer(f.read(n), np.uint8)
    (folder / "train").mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / "train" / f"{i:05d}.png"), pixels[i])
    (folder / "list.txt").write_text("".join(f"train/{i:05d}.png {labels[i]}\n" for i in range(n)))
    return list(zip(pixels, labels.tolist(), strict=True))


def test_real_mnist_digits_match_idx_pixels_and_caffes_training_lmdb(tmp_path):
    if not (DATA / "mnist").is_dir():
        pytest.skip("shared MNIST data absent")
    digits = _mnist_pngs(tmp_path, 12)
    convert_imageset(str(tmp_path) + "/", tmp_path / "list.txt", tmp_path / "db", gray=True)
    ours = _items(tmp_path / "db")
    for (key, value), (pixels, label) in zip(ours, digits, strict=True):
        datum = parse_datum(value, key)
        np.testing.assert_array_equal(datum_to_array(datum)[0], pixels)
        assert datum.label == label
    caffes = _items(require_golden() / "_data" / "mnist_train_lmdb")[:12]  # same digits, same list
    assert ours == caffes


def test_real_sun_jpegs_resized_raw_equals_resized_png(tmp_path):
    folder = DATA / "sun_subset8" / "train"
    if not folder.is_dir():
        pytest.skip("shared SUN data absent")
    files = sorted(folder.glob("*/*.jpg"))[::20][:4]
    (tmp_path / "list.txt").write_text("".join(f"{p.relative_to(folder)} {i}\n" for i, p in enumerate(files)))
    root = str(folder) + "/"
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "raw", resize_height=40, resize_width=32)
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "png", resize_height=40, resize_width=32,
                     encode_type="png")
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "jpg", encoded=True)
    for (kr, vr), (kp, vp), (kj, vj), path in zip(_items(tmp_path / "raw"), _items(tmp_path / "png"),
                                                  _items(tmp_path / "jpg"), files, strict=True):
        assert kr == kp == kj
        raw = datum_to_array(parse_datum(vr))
        assert raw.shape == (3, 40, 32)
        np.testing.assert_array_equal(datum_to_array(parse_datum(vp)), raw)  # lossless encode of the same
        assert parse_datum(vj).data == path.read_bytes()  # JPEG kept as the file's own bytes
        assert datum_to_array(parse_datum(vj)).shape[0] == 3


def test_read_list_splits_at_the_last_space(tmp_path):
    listfile = tmp_path / "l.txt"
    listfile.write_text("a b/c d.png 3\r\n\nx.jpg -1\n")
    entries = read_list(listfile)
    assert entries[0].path == "a b/c d.png" and entries[0].label == 3
    assert entries[1] is None  # a blank line keeps its index, as in Caffe's key numbering
    assert (entries[2].path, entries[2].label, entries[2].line) == ("x.jpg", -1, 3)
    listfile.write_text("ok.png 1\nno_label.png\n")
    with pytest.raises(CaffeError, match=r"l.txt:2: expected '<path> <integer label>'"):
        read_list(listfile)


def test_bad_images_and_sizes_name_the_list_line(tmp_path):
    folder = require_golden() / "lmdb_formats" / "images"
    (tmp_path / "l.txt").write_text("mnist_0.png 0\nmissing.png 1\n")
    with pytest.raises(CaffeError, match=r"l.txt:2: cannot read image '.*missing.png'"):
        convert_imageset(str(folder) + "/", tmp_path / "l.txt", tmp_path / "db", gray=True)
    (tmp_path / "l.txt").write_text("mnist_0.png 0\nsun_0.jpg 1\n")
    with pytest.raises(CaffeError, match=r"l.txt:2: 'sun_0.jpg' is \(300, 205\).*line 1 .*\(28, 28\)"):
        convert_imageset(str(folder) + "/", tmp_path / "l.txt", tmp_path / "db2", gray=True, check_size=True)


def test_shuffle_is_seeded_and_keys_follow_the_shuffled_index(tmp_path):
    folder = require_golden() / "lmdb_formats"
    a = convert_imageset(str(folder) + "/", folder / "list_mnist.txt", tmp_path / "a", gray=True, shuffle=True,
                         seed=3)
    convert_imageset(str(folder) + "/", folder / "list_mnist.txt", tmp_path / "b", gray=True, shuffle=True, seed=3)
    assert a["written"] == 5
    keys = [k for k, _ in _items(tmp_path / "a")]
    assert keys == [k for k, _ in _items(tmp_path / "b")]
    assert [k[:9] for k in keys] == [b"%08d_" % i for i in range(5)]
    assert sorted(k[9:] for k in keys) == sorted(f"images/mnist_{i}.png".encode() for i in range(5))


def test_append_resumes_a_partial_database(tmp_path):
    folder = require_golden() / "lmdb_formats"
    lines = (folder / "list_mnist.txt").read_text().splitlines()
    (tmp_path / "part.txt").write_text("\n".join(lines[:2]) + "\n")
    convert_imageset(str(folder) + "/", tmp_path / "part.txt", tmp_path / "db", gray=True)
    with pytest.raises(CaffeError, match="already exists"):
        convert_imageset(str(folder) + "/", folder / "list_mnist.txt", tmp_path / "db", gray=True)
    counts = convert_imageset(str(folder) + "/", folder / "list_mnist.txt", tmp_path / "db", gray=True,
                              mode="append")
    assert counts == {"written": 3, "skipped": 2}
    assert _items(tmp_path / "db") == _items(folder / "mnist_raw_lmdb")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="egomotion")
    add_data_parser(parser.add_subparsers(dest="verb", required=True))
    return run_data(parser.parse_args(list(argv)))


def test_cli_convert_mean_inspect(tmp_path, monkeypatch, capsys):
    case = require_golden() / "lmdb_formats"
    shutil.copytree(case / "images", tmp_path / "images")
    shutil.copy(case / "list_mnist.txt", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _cli("data", "convert-imageset", "--gray", "--shuffle=false", "./", "list_mnist.txt", "db") == 0
    assert _items("db") == _items(case / "mnist_raw_lmdb")
    assert _cli("data", "compute-image-mean", "db", "mean.binaryproto") == 0
    assert read_blobproto("mean.binaryproto").shape == (1, 1, 28, 28)
    capsys.readouterr()
    assert _cli("data", "inspect", "db", "--keys", "2") == 0
    out = capsys.readouterr().out
    assert "5 records" in out and "raw uint8: 5" in out and "1x28x28: 5" in out
    assert "labels: 0: 1, 1: 1, 4: 1, 5: 1, 9: 1" in out
    assert "first keys: 00000000_images/mnist_0.png, 00000001_images/mnist_1.png" in out
    with pytest.raises(CaffeError, match="already exists"):
        _cli("data", "convert-imageset", "--gray", "./", "list_mnist.txt", "db")
    assert _cli("data", "convert-imageset", "--gray=true", "--overwrite", "--encode_type", "png", "./",
                "list_mnist.txt", "db") == 0
    assert _items("db") == _items(case / "mnist_png_lmdb")
    with pytest.raises(CaffeError, match="leveldb is not supported"):
        _cli("data", "compute-image-mean", "--backend", "leveldb", "db")


def test_cli_mean_of_mismatched_records_names_the_key(tmp_path):
    from data_prep.datum import array_to_datum
    from data_prep.lmdb_io import LMDBWriter
    with LMDBWriter(tmp_path / "db") as w:
        w.put(b"a", array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString())
        w.put(b"b", array_to_datum(np.zeros((1, 3, 3), np.uint8)).SerializeToString())
    with pytest.raises(CaffeError, match="record 'b': 9 values"):
        _cli("data", "compute-image-mean", str(tmp_path / "db"))
