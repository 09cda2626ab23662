"""Datum ⇄ numpy against Caffe's own LMDBs (golden/lmdb_formats) and hand-built records."""

from __future__ import annotations

import cv2
import lmdb
import numpy as np
import pytest

from converter import caffe_pb2
from converter.errors import CaffeError
from data_prep.datum import (
    array_to_datum,
    datum_shape,
    datum_to_array,
    decode_image,
    encoded_datum,
    encoding_of,
    image_to_datum,
    label_datum,
    parse_datum,
)
from tests.golden import require_golden


def _records(db) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


@pytest.mark.parametrize("name", ["mnist_raw_lmdb", "mnist_png_lmdb"])
def test_caffe_mnist_lmdbs_decode_to_caffes_arrays(name):
    case = require_golden() / "lmdb_formats"
    records = _records(case / name)
    images = np.stack([datum_to_array(parse_datum(v, k), key=k) for k, v in records])
    labels = [parse_datum(v).label for _, v in records]
    np.testing.assert_array_equal(images, np.load(case / "decoded" / name / "images.npy"))
    assert labels == np.load(case / "decoded" / name / "labels.npy").tolist()
    assert images.dtype == np.uint8 and images.shape == (5, 1, 28, 28)


def test_caffe_jpeg_lmdb_decodes_to_caffes_bgr_arrays():
    case = require_golden() / "lmdb_formats"
    for i, (key, value) in enumerate(_records(case / "jpeg_lmdb")):
        datum = parse_datum(value, key)
        assert datum.encoded and not datum.HasField("channels")  # Caffe stores only data, label, encoded
        expected = np.load(case / "decoded" / "jpeg_lmdb" / f"image_{i}.npy")[0]
        np.testing.assert_array_equal(datum_to_array(datum), expected)
        assert datum_shape(datum) == expected.shape


def test_raw_datum_serialises_byte_identical_to_caffes_cvmattodatum():
    case = require_golden() / "lmdb_formats"
    images = np.load(case / "decoded" / "mnist_raw_lmdb" / "images.npy")
    labels = np.load(case / "decoded" / "mnist_raw_lmdb" / "labels.npy")
    for (key, value), image, label in zip(_records(case / "mnist_raw_lmdb"), images, labels, strict=True):
        assert image_to_datum(image[0], int(label)).SerializeToString() == value, key
        assert array_to_datum(image, int(label)).SerializeToString() == value, key


def test_colour_image_is_stored_as_bgr_planes():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # H, W, C as OpenCV holds it
    datum = image_to_datum(img, 7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 2, 3, 7)
    planes = np.frombuffer(datum.data, np.uint8).reshape(3, 2, 3)
    for c in range(3):
        for h in range(2):
            for w in range(3):
                assert planes[c, h, w] == img[h, w, c]


def test_float_datum_round_trip():
    values = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    datum = array_to_datum(values, 3)
    assert not datum.data and len(datum.float_data) == 24
    out = datum_to_array(parse_datum(datum.SerializeToString()))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values)


def test_uint8_data_wins_over_float_data():
    datum = array_to_datum(np.full((1, 1, 2), 9, np.uint8))
    datum.float_data.extend([1.0, 2.0])
    np.testing.assert_array_equal(datum_to_array(datum), [[[9, 9]]])


def test_thesis_label_record_layout():
    datum = label_datum([2, 3, 10])
    assert (datum.channels, datum.height, datum.width) == (3, 1, 1)
    assert datum.data == bytes([2, 3, 10])
    np.testing.assert_array_equal(datum_to_array(datum).ravel(), [2, 3, 10])
    with pytest.raises(CaffeError):
        label_datum([256])


def test_encoded_png_decodes_native_colour_and_gray():
    gray = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    datum = encoded_datum(png.tobytes(), 1)
    assert [f.name for f, _ in datum.ListFields()] == ["data", "label", "encoded"]
    np.testing.assert_array_equal(datum_to_array(datum), gray[None])
    colour = datum_to_array(datum, force_color=True)
    assert colour.shape == (3, 3, 4)
    for c in range(3):
        np.testing.assert_array_equal(colour[c], gray)
    np.testing.assert_array_equal(datum_to_array(datum, force_gray=True), gray[None])
    with pytest.raises(CaffeError, match="force_color and force_gray"):
        datum_to_array(datum, force_color=True, force_gray=True)
    assert encoding_of(datum.data) == "png"


def test_sixteen_bit_png_is_refused_like_caffes_cv8u_check():
    ok, png = cv2.imencode(".png", np.full((2, 2), 1000, np.uint16))
    assert ok
    with pytest.raises(CaffeError, match="unsigned byte"):
        decode_image(png.tobytes())


def test_corrupt_records_name_their_key():
    with pytest.raises(CaffeError, match="'00000007_x.png'"):
        parse_datum(b"\xff\xff\xff\xff", b"00000007_x.png")
    short = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(CaffeError, match="'k1'.*3 bytes.*1x2x2 = 4"):
        datum_to_array(short, key=b"k1")
    empty = caffe_pb2.Datum(channels=1, height=2, width=2)
    with pytest.raises(CaffeError, match="'k2'"):
        datum_to_array(empty, key=b"k2")
    bad = encoded_datum(b"not an image")
    with pytest.raises(CaffeError, match="'k3'.*could not be decoded"):
        datum_to_array(bad, key=b"k3")
