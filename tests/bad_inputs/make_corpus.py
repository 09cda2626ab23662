"""The binary half of the bad-input corpus, generated (deterministically) beside the checked-in text files.

``generate(dest)`` copies the text cases (``nets/``, ``solvers/``, ``lists/``, ``poses/``) into ``dest`` and writes
every binary case there: ``images/``, ``lmdb/``, ``leveldb/``, ``means/``, ``models/``, ``npy/``, ``idx/``,
``kitti/``. ``cases.tsv`` runs its command lines with ``dest`` as the working directory, so every path in it is
relative to ``dest``. Run ``python tests/bad_inputs/make_corpus.py DEST`` to look at the files by hand.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import cv2
import lmdb
import numpy as np

from converter import caffe_pb2

HERE = Path(__file__).parent
TEXT_FOLDERS = ("nets", "solvers", "solvers_ok", "lists", "poses")


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------
def _pattern(h: int, w: int, c: int = 3) -> np.ndarray:
    return (np.arange(h * w * c) * 7 % 251).astype(np.uint8).reshape(h, w, c)


def _encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares ``width x height`` grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 2, 9)  # two zero rows; the rest "follows"
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare ``width x height``."""
    data = bytearray(_encode(".jpg", _pattern(8, 8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def _images(dest: Path) -> dict[str, bytes]:
    folder = dest / "images"
    (folder / "sub").mkdir(parents=True)
    png32, jpg32 = _encode(".png", _pattern(32, 32)), _encode(".jpg", _pattern(32, 32))
    files = {
        "good.png": _encode(".png", _pattern(8, 8)),
        "good.jpg": _encode(".jpg", _pattern(8, 8)),
        "other_size.png": _encode(".png", _pattern(5, 6)),
        "truncated.png": png32[:len(png32) // 2],
        "truncated.jpg": jpg32[:len(jpg32) // 2],
        "zero.png": b"",
        "not_an_image.jpg": b"this is a text file that merely ends in .jpg\n",
        "bomb.png": png_bomb(),
        "bomb.jpg": jpeg_bomb(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # escapes through symbolic links: an image that is a link to a file outside the root, and a folder link
    # whose '..' leads outside although the path looks inside ('linkdir/../outside/secret.png')
    outside = dest / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(files["good.png"])
    (folder / "link_out.png").symlink_to(outside / "secret.png")
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    # list files that are not text: Latin-1 bytes, and a NUL byte inside a path
    (dest / "lists" / "not_utf8.txt").write_bytes(b"good.png 0\ncaf\xe9.png 1\n")
    (dest / "lists" / "nul_byte.txt").write_bytes(b"good.png 0\ngo\x00od.png 1\n")
    return files


# ---------------------------------------------------------------------------------------------------
# LMDBs of Datums
# ---------------------------------------------------------------------------------------------------
def _raw(c: int, h: int, w: int, label: int = 0) -> caffe_pb2.Datum:
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=_pattern(h, w, c).transpose(2, 0, 1).tobytes(),
                           label=label, encoded=False)


def _write_lmdb(path: Path, records: list[bytes]) -> None:
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=16 << 20, subdir=True)
    with env.begin(write=True) as txn:
        for i, value in enumerate(records):
            txn.put(f"{i:08d}".encode(), value)
    env.close()


def _lmdbs(dest: Path, images: dict[str, bytes]) -> None:
    root = dest / "lmdb"
    good = _raw(3, 8, 8).SerializeToString()
    encoded = lambda data: caffe_pb2.Datum(data=data, encoded=True, label=1).SerializeToString()  # noqa: E731
    dbs = {
        "good": [good, _raw(3, 8, 8, 1).SerializeToString()],
        "gray": [_raw(1, 8, 8).SerializeToString()],
        "corrupt_datum": [b"\xff\xff\xff\xff not a protobuf \x00\x01"],
        "truncated_datum": [good, good[:len(good) // 2]],
        "data_length_mismatch": [good, caffe_pb2.Datum(channels=3, height=8, width=8, data=b"\x01" * 10)
                                 .SerializeToString()],
        "float_count_mismatch": [good, caffe_pb2.Datum(channels=3, height=8, width=8, float_data=[0.5] * 7)
                                 .SerializeToString()],
        "zero_channels": [caffe_pb2.Datum(channels=0, height=8, width=8).SerializeToString()],
        "negative_dims": [caffe_pb2.Datum(channels=-3, height=8, width=8, data=b"\x01" * 10).SerializeToString()],
        "huge_header": [caffe_pb2.Datum(channels=100000, height=100000, width=100000).SerializeToString()],
        "encoded_garbage": [good, encoded(b"\x89PNG but not really a PNG")],
        "encoded_empty": [encoded(b"")],
        "bomb_png": [encoded(images["bomb.png"])],
        "bomb_jpg": [good, encoded(images["bomb.jpg"])],
        "truncated_png_record": [good, encoded(images["truncated.png"])],
        "truncated_jpg_record": [good, encoded(images["truncated.jpg"])],
        "mixed_channels": [good, _raw(1, 8, 8).SerializeToString()],
        "empty": [],
    }
    for name, records in dbs.items():
        _write_lmdb(root / name, records)
    # a database cut short (an interrupted copy): 40 records on several pages, the file halved; and an empty file
    _write_lmdb(root / "truncated_mdb", [_raw(3, 8, 8, i % 2).SerializeToString() for i in range(40)])
    data = (root / "truncated_mdb" / "data.mdb").read_bytes()
    (root / "truncated_mdb" / "data.mdb").write_bytes(data[:len(data) // 2])
    # 300 records: a branch page over leaf pages; the first leaf's flags flipped to 'branch' (lmdb aborts)
    _write_lmdb(root / "page_type_flipped", [caffe_pb2.Datum(channels=3, height=1, width=1, data=bytes([i % 250, 1, 2]))
                                             .SerializeToString() for i in range(300)])
    data = bytearray((root / "page_type_flipped" / "data.mdb").read_bytes())
    leaf = next(page for page in range(2, len(data) // 4096) if struct.unpack_from("<H", data, page * 4096 + 10)[0] == 2)
    struct.pack_into("<H", data, leaf * 4096 + 10, 1)
    (root / "page_type_flipped" / "data.mdb").write_bytes(bytes(data))
    (root / "zero_mdb").mkdir()
    (root / "zero_mdb" / "data.mdb").write_bytes(b"")
    (root / "not_lmdb").mkdir()
    (root / "not_lmdb" / "README").write_text("an ordinary folder\n")
    (root / "garbage_mdb").mkdir()
    (root / "garbage_mdb" / "data.mdb").write_bytes(bytes(range(256)) * 64)
    (root / "a_file").write_text("a file, not a database\n")
    leveldb = dest / "leveldb"
    leveldb.mkdir()
    (leveldb / "CURRENT").write_text("MANIFEST-000002\n")
    (leveldb / "000003.log").write_bytes(b"\x00" * 16)


# ---------------------------------------------------------------------------------------------------
# BlobProtos (mean files) and NetParameters (weights)
# ---------------------------------------------------------------------------------------------------
def _blob(values, shape=None, legacy=None) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    if shape is not None:
        blob.shape.dim.extend(shape)
    if legacy is not None:
        blob.num, blob.channels, blob.height, blob.width = legacy
    blob.data.extend(np.asarray(values, dtype=np.float32).ravel().tolist())
    return blob


def _means(dest: Path) -> None:
    folder = dest / "means"
    folder.mkdir()
    good = _blob(np.full(3 * 8 * 8, 100.0), legacy=(1, 3, 8, 8)).SerializeToString()
    files = {
        "truncated.binaryproto": good[:len(good) // 3],
        "count_mismatch.binaryproto": _blob(np.zeros(10), legacy=(1, 3, 8, 8)).SerializeToString(),
        "huge_header.binaryproto": _blob([], legacy=(1, 100000, 100000, 100000)).SerializeToString(),
        "wrong_shape.binaryproto": _blob(np.zeros(3 * 4 * 4), legacy=(1, 3, 4, 4)).SerializeToString(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _ip_model(weight: caffe_pb2.BlobProto | None, bias: caffe_pb2.BlobProto | None) -> bytes:
    """A .caffemodel for nets/tiny_ip.prototxt (InnerProduct 'ip': weight 2x3, bias 2)."""
    net = caffe_pb2.NetParameter(name="tiny_ip")
    layer = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    layer.blobs.extend(b for b in (weight, bias) if b is not None)
    return net.SerializeToString()


def _onnx_with_metadata(key: str, value: str) -> bytes:
    """A one-node ONNX model (Identity of a 1x3x8x8 input) carrying a metadata entry."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["data"], ["out"])], "g",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.helper.set_model_props(model, {key: value})
    return model.SerializeToString()


def _models(dest: Path) -> None:
    folder = dest / "models"
    folder.mkdir()
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    bias = _blob([0.5, -0.5], shape=(2,))
    nan_w = w.copy()
    nan_w[1, 2] = np.nan
    inf_w = w.copy()
    inf_w[0, 0] = np.inf
    good = _ip_model(_blob(w, shape=(2, 3)), bias)
    files = {
        "nan.caffemodel": _ip_model(_blob(nan_w, shape=(2, 3)), bias),
        "inf.caffemodel": _ip_model(_blob(inf_w, shape=(2, 3)), bias),
        "wrong_shape.caffemodel": _ip_model(_blob(np.zeros(9), shape=(3, 3)), bias),
        "wrong_blob_count.caffemodel": _ip_model(_blob(w, shape=(2, 3)), None),
        "count_mismatch.caffemodel": _ip_model(_blob(np.zeros(5), shape=(2, 3)), bias),
        "huge_header.caffemodel": _ip_model(_blob([], shape=(10**12, 10**12)), bias),
        "negative_dims.caffemodel": _ip_model(_blob(np.zeros(6), shape=(-2, -3)), bias),
        "garbage.caffemodel": bytes((i * 37 + 11) % 256 for i in range(300)),
        "truncated.caffemodel": good[:len(good) - 7],
        "empty.caffemodel": b"",
        "garbage.solverstate": b"\xff" * 40,
        "negative_iter.solverstate": caffe_pb2.SolverState(iter=-5, learned_net="models/good.caffemodel")
        .SerializeToString(),
        "negative_step.solverstate": caffe_pb2.SolverState(iter=3, current_step=-1,
                                                           learned_net="models/good.caffemodel").SerializeToString(),
        "bad_meta.onnx": _onnx_with_metadata("caffe.transform_param", "crop_size: banana"),
        "garbage.onnx": b"\x08\x07 not an onnx model " * 4,
        "good.caffemodel": good,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "folder.caffemodel").mkdir()


def _npy_claiming(npy: bytes, shape: str) -> bytes:
    """``npy`` with its header's shape replaced by ``shape`` (the header padded again to 64 bytes)."""
    length = int.from_bytes(npy[8:10], "little")
    header = npy[10:10 + length].decode("latin1").strip()
    header = header.replace("(2, 3)", shape)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return npy[:8] + len(header).to_bytes(2, "little") + header.encode("latin1") + npy[10 + length:]


def _npys(dest: Path) -> None:
    folder = dest / "npy"
    folder.mkdir()
    np.save(folder / "x23.npy", np.ones((2, 3), np.float32))
    np.save(folder / "wrong_rank.npy", np.ones(5, np.float32))
    np.save(folder / "pickled.npy", np.array([{"payload": "os.system"}], dtype=object), allow_pickle=True)
    (folder / "truncated.npy").write_bytes((folder / "x23.npy").read_bytes()[:70])
    (folder / "text.npy").write_text("1 2 3\n")
    np.save(folder / "complex.npy", np.ones((2, 3), np.complex64))
    np.save(folder / "x45.npy", np.ones((4, 5), np.float32))
    np.save(folder / "x238.npy", np.ones((2, 3, 8), np.float32))
    header = (folder / "x23.npy").read_bytes()  # the same 24 bytes of data under a header claiming 4e15
    (folder / "huge_header.npy").write_bytes(_npy_claiming(header, "(100000, 100000, 100000)"))
    np.save(folder / "x23_f64.npy", np.ones((2, 3), np.float64))


# ---------------------------------------------------------------------------------------------------
# MNIST IDX folders (each holds the four files; only one of them is bad)
# ---------------------------------------------------------------------------------------------------
def _idx(dtype_code: int, shape: tuple[int, ...], body: bytes) -> bytes:
    return b"\x00\x00" + bytes([dtype_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


def _idx_folders(dest: Path) -> None:
    n = 6
    images = _idx(0x08, (n, 28, 28), _pattern(n * 28, 28, 1).tobytes())
    labels = _idx(0x08, (n,), bytes(range(n)))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    bad_images = {
        "bad_magic": b"\x12\x34" + images[2:],
        "unknown_type": images[:2] + b"\x07" + images[3:],
        "truncated_header": images[:9],
        "huge_header": _idx(0x08, (0xFFFFFFFF, 0xFFFFFFFF, 28), b""),
        "short_body": images[:-100],
        "long_body": images + b"\x00" * 5,
        "images_1d": _idx(0x08, (n * 28 * 28,), _pattern(n * 28, 28, 1).tobytes()),
        "images_float": _idx(0x0D, (n, 28, 28), np.zeros((n, 28, 28), ">f4").tobytes()),
        "wrong_digit_size": _idx(0x08, (n, 14, 56), _pattern(n * 28, 28, 1).tobytes()),
    }
    bad_labels = {
        "label_count_mismatch": _idx(0x08, (n - 1,), bytes(range(n - 1))),
        "label_out_of_range": _idx(0x08, (n,), bytes([0, 1, 2, 200, 4, 5])),
        "labels_2d": _idx(0x08, (n, 1), bytes(range(n))),
    }
    root = dest / "idx"
    for case, data in bad_images.items():
        folder = root / case
        folder.mkdir(parents=True)
        for name, content in zip(names, (data, labels, images, labels), strict=True):
            (folder / name).write_bytes(content)
    for case, data in bad_labels.items():
        folder = root / case
        folder.mkdir(parents=True)
        for name, content in zip(names, (images, data, images, labels), strict=True):
            (folder / name).write_bytes(content)
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: 16 MB of zeros in 16 KB, the header declares 3.9 GB
    gz = {
        "corrupt_gzip": gzip.compress(images)[:-20] + b"\x00" * 20,
        "gzip_bomb": bomb.compress(_idx(0x08, (5000, 28000, 28), b"")) + bomb.compress(bytes(16 << 20))
        + bomb.flush(),
    }
    for case, data in gz.items():
        folder = root / case
        folder.mkdir(parents=True)
        (folder / "train-images-idx3-ubyte.gz").write_bytes(data)
        for name, content in zip(names[1:], (labels, images, labels), strict=True):
            (folder / name).write_bytes(content)
    partial = root / "missing_file"
    partial.mkdir(parents=True)
    for name, content in zip(names[:3], (images, labels, images), strict=True):
        (partial / name).write_bytes(content)


# ---------------------------------------------------------------------------------------------------
# KITTI layouts (three 16x8 frames of sequence 00 and one poses/00.txt from poses/)
# ---------------------------------------------------------------------------------------------------
def _kitti(dest: Path) -> None:
    frame = _encode(".png", _pattern(8, 16, 1)[:, :, 0])
    for poses in sorted((HERE / "poses").glob("*.txt")):
        root = dest / "kitti" / poses.stem
        frames = root / "sequences" / "00" / "image_0"
        frames.mkdir(parents=True)
        for i in range(3):
            (frames / f"{i:06d}.png").write_bytes(frame)
        (root / "poses").mkdir()
        shutil.copy(poses, root / "poses" / "00.txt")
    corrupt = dest / "kitti" / "corrupt_frame"  # frame 0 is fine (it is read up front), 1 and 2 are truncated
    shutil.copytree(dest / "kitti" / "good", corrupt)
    for i in (1, 2):
        (corrupt / "sequences" / "00" / "image_0" / f"{i:06d}.png").write_bytes(frame[:len(frame) // 2])
    latin1 = dest / "kitti" / "latin1_poses"  # a poses file with a Latin-1 byte in its second line
    shutil.copytree(dest / "kitti" / "good", latin1)
    lines = (latin1 / "poses" / "00.txt").read_bytes().split(b"\n")
    (latin1 / "poses" / "00.txt").write_bytes(b"\n".join([lines[0], lines[1] + b" \xb0", *lines[2:]]))
    sun = dest / "sun" / "Partitions"  # SUN397 partition files: a Latin-1 class name, a NUL byte
    sun.mkdir(parents=True)
    (sun / "Training_01.txt").write_bytes(b"/a/abbey/sun_1.jpg\n/c/caf\xe9/sun_2.jpg\n")
    (sun / "Testing_01.txt").write_bytes(b"/a/abbey/sun_3.jpg\n")
    (sun / "Training_02.txt").write_bytes(b"/a/abbey/sun_1.jpg\n/a/ab\x00bey/sun_2.jpg\n")
    (sun / "Testing_02.txt").write_bytes(b"/a/abbey/sun_3.jpg\n")
    os.mkfifo(dest / "out" / "fifo")  # write targets that a rename would replace
    os.mkfifo(dest / "out" / "fifo.png")
    (dest / "train_ok.log").write_text("I1204 10:00:00.000000 1 solver.cpp:239] Iteration 0 (0 iter/s, 0.1s/1 iters), "
                                       "loss = 2.5\n")


def generate(dest: str | Path) -> Path:
    """Write the whole corpus into ``dest`` (created; must not exist yet) and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    for name in TEXT_FOLDERS:
        shutil.copytree(HERE / name, dest / name)
    images = _images(dest)
    _lmdbs(dest, images)
    _means(dest)
    _models(dest)
    _npys(dest)
    _idx_folders(dest)
    (dest / "out").mkdir()
    _kitti(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/bad_inputs/make_corpus.py DEST")
    print(generate(sys.argv[1]))
