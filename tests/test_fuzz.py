"""Property-based fuzzing of the readers of untrusted files (targets in ``tests/fuzzing.py``): the prototxt
reader, the caffemodel reader, the Datum decoder and the IDX reader may only return or raise CaffeError,
within a deadline. A few hundred cases per target here (FUZZ_EXAMPLES overrides; derandomized so the suite
is reproducible); ``benchmarks/fuzz.py`` runs 10,000+ per target. Below them: the crashes fuzzing found,
kept as regression tests.
"""

from __future__ import annotations

import gzip
import os
import struct
from datetime import timedelta

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import blob_to_array
from data_prep.datum import datum_to_array, decode_image, encoded_image_size
from data_prep.idx import read_idx
from tests import fuzzing

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
pytestmark = [pytest.mark.filterwarnings("ignore:Generating overly large repr"),
              pytest.mark.filterwarnings("ignore:invalid octal escape sequence:DeprecationWarning")]


@pytest.fixture(scope="module", autouse=True)
def warm():
    fuzzing.warm_up()  # corpora, nets and imports outside the per-case deadline


def fuzz_settings(examples: int = EXAMPLES):
    return settings(max_examples=examples, deadline=timedelta(seconds=3), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz(name: str, examples: int = EXAMPLES) -> None:
    target = fuzzing.TARGETS[name]()

    @fuzz_settings(examples)
    @given(target.strategy)
    def check(case):
        target.run(case)

    check()


def test_fuzz_prototxt_reader():
    _fuzz("prototxt")


def test_fuzz_caffemodel_reader():
    if not fuzzing.caffemodel_cases():
        pytest.skip("golden caffemodels are absent")
    _fuzz("caffemodel")


def test_fuzz_datum_decoder():
    _fuzz("datum")


def test_fuzz_idx_reader():
    _fuzz("idx")


# ------------------------------------------------------------------------------------------------
# Crashes the fuzzer found (each was a ValueError, cv2.error or a multi-GB allocation before the fix)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims,legacy", [((0, -1), False), ((-1, -1), False), ((-1, -1, 1, 1), True),
                                         ((1 << 32, 1 << 32), False), ((0, 1 << 62, 4), False),
                                         ((0, 2**31 - 1, 1, 2**31 - 1), True)])
def test_blob_with_negative_or_overflowing_shape(dims, legacy):
    blob = caffe_pb2.BlobProto()
    if legacy:
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.dim.extend(dims)
    blob.data.extend([1.0] if dims[0] > 0 else [])
    with pytest.raises(CaffeError, match="negative dimension|needs 18446744073709551616|absurd"):
        blob_to_array(blob)


@pytest.mark.parametrize("field", ["data", "float_data"])
def test_datum_with_negative_sizes(field):
    d = caffe_pb2.Datum(channels=-1, height=-1, width=1)
    if field == "data":
        d.data = b"a"
    else:
        d.float_data.append(1.0)
    with pytest.raises(CaffeError, match="negative size"):
        datum_to_array(d)


def test_empty_encoded_datum():
    with pytest.raises(CaffeError, match="could not be decoded"):
        datum_to_array(caffe_pb2.Datum(encoded=True, data=b""))


def test_jpeg_declaring_huge_size_is_refused_before_decoding():
    ok, buf = cv2.imencode(".jpg", np.full((16, 12, 3), 90, np.uint8))
    data = bytearray(buf.tobytes())
    assert encoded_image_size(bytes(data)) == (12, 16)
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 30000, 30000)  # OpenCV would allocate 2.7 GB
    with pytest.raises(CaffeError, match="30000x30000 pixels in .* bytes.*decompression bomb"):
        decode_image(bytes(data))


def test_idx_header_product_does_not_wrap(tmp_path):
    path = tmp_path / "x-idx"
    # 2**32 - 1 to the 8th power wraps to a small number in uint64 arithmetic
    path.write_bytes(b"\x00\x00\x08\x08" + struct.pack(">8I", *[0xFFFFFFFF] * 8))
    with pytest.raises(CaffeError, match="declares .* bytes of data, refusing"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 0, 0x81030000, 0xFFFFFFFF))  # empty, absurd axes
    with pytest.raises(CaffeError, match="absurd axes"):
        read_idx(path)


def test_idx_gzip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb-idx.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1 << 31) + bytes(1 << 20)))
    with pytest.raises(CaffeError, match="compressed bytes, refusing"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(1 << 20)))
    with pytest.raises(CaffeError, match="more data than its header declares"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(100))[:-12])
    with pytest.raises(CaffeError, match="truncated"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + struct.pack(">2I", 2, 3) + bytes(range(6))))
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_png_chunk_declaring_4_gb_is_refused_before_decoding():
    ok, buf = cv2.imencode(".png", np.full((9, 13, 3), 7, np.uint8))
    data = bytearray(buf.tobytes())
    idat = data.find(b"IDAT") - 4
    data[idat:idat + 4] = struct.pack(">I", 0xFF000173)  # OpenCV 4.14 allocates 4 GB for this chunk
    with pytest.raises(CaffeError, match="chunk longer than the data"):
        decode_image(bytes(data))
    assert decode_image(buf.tobytes()).shape == (3, 9, 13)


def test_fuzz_lmdb_reader():
    """Truncated and bit-flipped data.mdb files: refused with one line, never a SIGBUS or SIGSEGV."""
    _fuzz("lmdb", max(100, EXAMPLES // 3))


def test_lmdb_page_of_the_wrong_type_is_one_line():
    """Found by fuzzing: a leaf page whose flags say 'branch' passes the size check; lmdb's own assertion then
    aborts the process that reads it (SIGABRT), here the verifying child, so the reader refuses the file."""
    data = bytearray(fuzzing.lmdb_corpus()[1])  # 300 records: a branch page above leaf pages 4, 5, 7, ...
    assert struct.unpack_from("<H", data, 4 * 4096 + 10)[0] == 0x2  # P_LEAF
    struct.pack_into("<H", data, 4 * 4096 + 10, 0x1)  # P_BRANCH
    assert fuzzing.run_lmdb(bytes(data)) == "refused"


def test_a_name_with_a_newline_in_a_caffemodel_is_quoted_into_one_line():
    """Found by fuzzing: a layer named 'a\\nb' in a .caffemodel made a two-line error; every CaffeError is one
    line, its control characters escaped."""
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="fc\nevil\tname", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend([4, 1 << 62])
    outcome = fuzzing.run_caffemodel(("", net.SerializeToString()))
    assert outcome == "refused"
    with pytest.raises(CaffeError, match=r"layer 'fc\\nevil\\tname'"):
        raise CaffeError(f"layer '{layer.name}'")
