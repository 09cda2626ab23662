"""Fuzz targets for the five readers of untrusted files, shared by ``tests/test_fuzz.py`` (a few hundred
cases each, in the suite) and ``benchmarks/fuzz.py`` (at least 10,000 each).

Each :class:`Target` pairs a hypothesis strategy of inputs with a function feeding one input to a reader
the way the project reads files: through a real file for the prototxt, caffemodel and IDX readers, as an
LMDB value for the Datum decoder. The contract under test: the reader returns, or raises
:class:`CaffeError` (one line for the user); any other exception is a bug, and so is a case that takes
more than the deadline or allocates memory its input does not justify (a declared huge size must be
refused before allocating).

Inputs are random bytes or text, structured messages with hostile field values, and — most useful —
real files mutated byte by byte (flips, interesting integers, inserted tokens, deleted / duplicated /
spliced ranges, truncation): prototxts from ``shared/reference/conformance``, the golden
``init.caffemodel`` files, serialized raw / float / PNG / JPEG Datums, and small IDX files, raw and gzip.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from converter import caffe_pb2
from converter.errors import CaffeError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
CONFORMANCE = REFERENCE / "conformance"
GOLDEN = REFERENCE / "golden"
MNIST = ROOT.parent / "shared" / "data" / "mnist"


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy
    run: Callable[[object], str]
    what: str


# ------------------------------------------------------------------------------------------------
# Generic byte mutation
# ------------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
OPS = ("flip", "byte", "int", "varint", "insert", "token", "delete", "duplicate", "truncate", "splice", "repeat")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Mutant:
    """A corpus file and the edits made to it; ``bytes(m)`` is the mutated file. Only the (small) edits are
    kept, not the bytes: hypothesis holds on to generated values, which for 848 kB caffemodels adds up."""

    def __init__(self, corpus: tuple[bytes, ...], index: int, ops: tuple[tuple, ...]):
        self.corpus, self.index, self.ops = corpus, index, ops

    def __bytes__(self) -> bytes:
        data = bytearray(self.corpus[self.index])
        for op in self.ops:
            _apply(data, op, self.corpus)
        return bytes(data)

    def __repr__(self) -> str:
        return f"Mutant(corpus file {self.index} of {len(self.corpus)}, ops={self.ops!r})"


def _apply(data: bytearray, op: tuple, corpus: tuple[bytes, ...]) -> None:
    kind, pos, *args = op
    if kind in ("flip", "byte"):
        data[pos] = data[pos] ^ args[0] if kind == "flip" else args[0]
    elif kind in ("overwrite", "varint"):
        data[pos:pos + args[1]] = args[0]
    elif kind == "insert":
        data[pos:pos] = args[0]
    elif kind == "delete":
        del data[pos:pos + args[0]]
    elif kind == "duplicate":
        start, length, times = args
        data[pos:pos] = data[start:start + length] * times
    elif kind == "truncate":
        del data[pos:]
    elif kind == "splice":
        other, cut = args
        data[pos:] = corpus[other][cut:]


@st.composite
def mutated(draw, corpus: tuple[bytes, ...], tokens: tuple[bytes, ...] = (), max_ops: int = 6) -> Mutant:
    """One corpus file with 1..max_ops random edits."""
    index = draw(st.integers(0, len(corpus) - 1))
    data = bytearray(corpus[index])
    ops = []
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(OPS if tokens else [o for o in OPS if o != "token"]))
        n = len(data)
        pos = draw(st.integers(0, n))
        op: tuple | None = None
        if kind == "flip" and n:
            op = ("flip", min(pos, n - 1), 1 << draw(st.integers(0, 7)))
        elif kind == "byte" and n:
            op = ("byte", min(pos, n - 1), draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)))
        elif kind == "int":
            value = draw(st.sampled_from(INTERESTING))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            order = draw(st.sampled_from(["<", ">"]))
            packed = struct.pack(f"{order}Q", value & ((1 << 64) - 1))
            op = ("overwrite", pos, packed[:width] if order == "<" else packed[8 - width:], width)
        elif kind == "varint":
            op = ("varint", pos, _varint(draw(st.sampled_from(INTERESTING))), draw(st.integers(0, 10)))
        elif kind == "insert":
            op = ("insert", pos, draw(st.binary(min_size=1, max_size=16)))
        elif kind == "token":
            op = ("insert", pos, draw(st.sampled_from(tokens)))
        elif kind == "delete":
            op = ("delete", pos, draw(st.integers(1, max(1, n // 4))))
        elif kind == "duplicate" and n:
            op = ("duplicate", pos, draw(st.integers(0, n - 1)), draw(st.integers(1, 256)), 1)
        elif kind == "repeat" and n:
            op = ("duplicate", pos, draw(st.integers(0, n - 1)), draw(st.integers(1, 16)), draw(st.integers(2, 200)))
        elif kind == "truncate":
            op = ("truncate", pos)
        elif kind == "splice":
            other = draw(st.integers(0, len(corpus) - 1))
            op = ("splice", pos, other, draw(st.integers(0, len(corpus[other]))))
        if op is not None:
            _apply(data, op, corpus)
            ops.append(op)
    return Mutant(corpus, index, tuple(ops))


_SCRATCH: tempfile.TemporaryDirectory | None = None


def scratch(name: str, data: bytes) -> Path:
    """``data`` written to a file named ``name`` in this process's scratch folder."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="egomotion-fuzz-")
    path = Path(_SCRATCH.name) / name
    path.write_bytes(data)
    return path


def caffe_errors_only(fn: Callable[[], object]) -> str:
    """Run ``fn``: 'accepted', or 'refused' for a CaffeError (the reader's correct answer to a bad file);
    anything else propagates."""
    try:
        fn()
    except CaffeError as e:
        assert "\n" not in str(e).strip(), f"a CaffeError must be one line: {str(e)!r}"
        return "refused"
    return "accepted"


# ------------------------------------------------------------------------------------------------
# Prototxt (nets and solvers)
# ------------------------------------------------------------------------------------------------
PROTOTXT_TOKENS = tuple(t.encode() for t in [
    "{", "}", ":", "\"", "'", "\\", "#", "\n", " ", "layer {", "layers {", "name: ", "type: ", "bottom: \"data\"",
    "top: \"data\"", "include { phase: TEST }", "exclude { phase: TRAIN }", "phase: TRAIN", "phase: 7",
    "-1", "0", "4294967296", "99999999999999999999", "1e999", "-1e-999", "nan", "inf", "-inf", "0x10", "true",
    "false", "CONVOLUTION", "input: \"x\"", "input_dim: 1", "input_shape { dim: 1 }", "layer { layer {",
    "\"\\x\"", "\"\\777\"", "\"\\u\"", "\xff", "\x00", "[", "]", "<", ">", ";", ",", "blobs_lr: 1",
    "solver_type: ADAM", "type: \"Adam\"", "snapshot_prefix: \"/\"", "net_param {", "state { stage: \"a\" }",
    "convolution_param { pad: 1 pad: 2 pad: 3 }", "blobs { shape { dim: -1 } data: 1 }", "padding",
])


@cache
def prototxt_corpus() -> tuple[tuple[str, bytes], ...]:
    """(kind, bytes) of every conformance prototxt: 'solver' for solvers, 'net' for nets."""
    files = sorted(CONFORMANCE.glob("*.prototxt"))
    return tuple(("solver" if "solver" in p.name else "net", p.read_bytes()) for p in files)


def _prototxt_strategy() -> st.SearchStrategy:
    corpus = prototxt_corpus()
    kinds = st.sampled_from(["net", "solver"])
    random_text = st.tuples(kinds, st.text(max_size=400).map(lambda s: s.encode("utf-8", "surrogatepass")))
    random_bytes = st.tuples(kinds, st.binary(max_size=400))
    soup = st.tuples(kinds, st.lists(st.sampled_from(PROTOTXT_TOKENS), max_size=60).map(b" ".join))
    strategies = [random_text, random_bytes, soup]
    if corpus:
        for kind in ("net", "solver"):
            files = tuple(data for k, data in corpus if k == kind)
            if files:
                strategies.append(st.tuples(st.just(kind), mutated(files, PROTOTXT_TOKENS)))
    return st.one_of(*strategies)


def run_prototxt(case: tuple[str, bytes]) -> str:
    """``read_net`` (+ Caffe's phase filtering) or ``read_solver`` + ``check_solver`` of the bytes as a file."""
    from converter.io import filter_net, net_state, read_net, read_solver
    from runner.solver import check_solver

    kind, data = case[0], bytes(case[1])

    def read() -> None:
        if kind == "net":
            path = scratch("net.prototxt", data)
            net = read_net(path)
            filter_net(net, path=path)
            filter_net(net, net_state("TRAIN"), path)
            filter_net(net, net_state("TEST"), path)
        else:
            path = scratch("solver.prototxt", data)
            check_solver(read_solver(path), str(path))

    return caffe_errors_only(read)


# ------------------------------------------------------------------------------------------------
# .caffemodel
# ------------------------------------------------------------------------------------------------
SIAMESE_SHAPES = {"pair_data": (4, 2, 28, 28), "sim": (4,)}


@cache
def caffemodel_cases() -> tuple[tuple[str, bytes], ...]:
    return tuple((p.parent.name, p.read_bytes()) for p in sorted(GOLDEN.glob("*/init.caffemodel")))


@cache
def golden_nets() -> dict[str, object]:
    """The golden cases' nets that build without their data (the weights of a mutated file go into them)."""
    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet

    nets = {}
    for case, _ in caffemodel_cases():
        folder = GOLDEN / case
        proto = folder / "net.prototxt" if (folder / "net.prototxt").exists() else folder / "train_test.prototxt"
        try:
            nets[case] = CaffeNet(filter_net(read_net(proto), net_state("TRAIN")),
                                  SIAMESE_SHAPES if case == "siamese_contrastive" else None)
        except CaffeError:
            continue  # e.g. 'loss' reads its infogain matrix relative to its folder
    return nets


finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_float = st.floats(width=32)
dims = st.integers(-2, 6) | st.sampled_from([0, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 62, -(1 << 63)])


@st.composite
def blob_protos(draw) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    if draw(st.booleans()):
        blob.shape.dim.extend(draw(st.lists(dims, max_size=5)))
    else:
        for field in ("num", "channels", "height", "width"):
            if draw(st.booleans()):
                setattr(blob, field, draw(st.integers(-3, 6) | st.sampled_from([(1 << 31) - 1, -(1 << 31)])))
    values = draw(st.lists(finite | any_float, max_size=80))
    (blob.double_data if draw(st.booleans()) else blob.data).extend(values)
    return blob


@st.composite
def structured_caffemodels(draw) -> tuple[str, bytes]:
    """A NetParameter naming the golden nets' layers (V2 or V1) with blobs of hostile shapes and values."""
    cases = caffemodel_cases()
    case = draw(st.sampled_from([c for c, _ in cases]))
    source = caffe_pb2.NetParameter.FromString(dict(cases)[case])
    names = [lp.name for lp in source.layer] or ["x"]
    net = caffe_pb2.NetParameter(name=draw(st.text(max_size=8)))
    v1 = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = draw(st.sampled_from(names) | st.text(max_size=8))
        if v1:
            layer.type = draw(st.sampled_from(caffe_pb2.V1LayerParameter.LayerType.values()))
        else:
            layer.type = draw(st.sampled_from([lp.type for lp in source.layer] or ["Convolution"]))
        layer.blobs.extend(draw(st.lists(blob_protos(), max_size=3)))
    return case, net.SerializeToString()


def _caffemodel_strategy() -> st.SearchStrategy:
    cases = caffemodel_cases()
    if not cases:
        return st.tuples(st.just(""), st.binary(max_size=2000))
    names = st.sampled_from([c for c, _ in cases])
    by_file = st.one_of(*[st.tuples(st.just(c), mutated((data,))) for c, data in cases])
    return st.one_of(st.tuples(names, st.binary(max_size=2000)), by_file, structured_caffemodels())


def run_caffemodel(case: tuple[str, bytes]) -> str:
    """``read_net`` of the bytes as a .caffemodel, every blob as an array, then the weights copied into
    the golden case's net as ``--weights`` does (Net::CopyTrainedLayersFrom)."""
    from converter.io import blob_to_array, read_net
    from converter.weights import copy_trained_layers

    name, data = case[0], bytes(case[1])

    def read() -> None:
        path = scratch("weights.caffemodel", data)
        net = read_net(path)
        for lp in net.layer:
            for j, blob in enumerate(lp.blobs):
                blob_to_array(blob, f"{path}: layer '{lp.name}' blob {j}")
        target = golden_nets().get(name)
        if target is not None:
            copy_trained_layers(target, net, str(path))

    return caffe_errors_only(read)


# ------------------------------------------------------------------------------------------------
# Datum (LMDB values)
# ------------------------------------------------------------------------------------------------
@cache
def datum_corpus() -> tuple[bytes, ...]:
    """Serialized Datums as the project writes them: raw uint8, float, labels, PNG and JPEG, gray and colour."""
    import cv2

    from data_prep.datum import array_to_datum, encoded_datum, label_datum

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 17), dtype=np.uint8)
    color = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = [array_to_datum(gray[None], 3).SerializeToString(),
           array_to_datum(color.transpose(2, 0, 1), 1).SerializeToString(),
           array_to_datum(rng.standard_normal((2, 3, 4)).astype(np.float32), 7).SerializeToString(),
           label_datum([1, 2, 3], 5).SerializeToString()]
    for img in (gray, color):
        for ext in (".png", ".jpg"):
            ok, buf = cv2.imencode(ext, img)
            assert ok
            out.append(encoded_datum(buf.tobytes(), 2).SerializeToString())
    return tuple(out)


@st.composite
def structured_datums(draw) -> bytes:
    """Datums with hostile headers: sizes that do not match the data, negative or huge, encoded garbage."""
    d = caffe_pb2.Datum()
    size = st.integers(-2, 40) | st.sampled_from([(1 << 31) - 1, -(1 << 31), 1 << 16])
    for field in ("channels", "height", "width"):
        if draw(st.booleans()):
            setattr(d, field, draw(size))
    if draw(st.booleans()):
        d.data = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        d.float_data.extend(draw(st.lists(any_float, max_size=60)))
    if draw(st.booleans()):
        d.encoded = draw(st.booleans())
    if draw(st.booleans()):
        d.label = draw(st.integers(-(1 << 31), (1 << 31) - 1))
    if d.encoded and draw(st.booleans()):
        d.data = draw(st.sampled_from(datum_corpus()))[-draw(st.integers(0, 400)):]
    return d.SerializeToString()


@st.composite
def payload_mutated_datums(draw) -> bytes:
    """A corpus Datum whose image bytes (PNG/JPEG or raw pixels) are mutated, the record itself intact."""
    d = caffe_pb2.Datum.FromString(draw(st.sampled_from(datum_corpus())))
    if d.data:
        d.data = bytes(draw(mutated((d.data,))))
    return d.SerializeToString()


def _datum_strategy() -> st.SearchStrategy:
    return st.one_of(st.binary(max_size=600), structured_datums(), mutated(datum_corpus()),
                     payload_mutated_datums())


def run_datum(value: bytes | Mutant) -> str:
    """``parse_datum`` then ``datum_to_array`` / ``datum_shape`` natively, forced to colour and to gray."""
    from data_prep.datum import datum_shape, datum_to_array, parse_datum

    value = bytes(value)

    def read() -> None:
        datum = parse_datum(value, b"00000001")
        datum_shape(datum, key=b"00000001")
        for color, gray in ((False, False), (True, False), (False, True)):
            array = datum_to_array(datum, color, gray, b"00000001")
            assert array.ndim == 3
            if not datum.encoded:
                break

    return caffe_errors_only(read)


# ------------------------------------------------------------------------------------------------
# IDX (MNIST)
# ------------------------------------------------------------------------------------------------
IDX_CODES = {0x08: "B", 0x09: "b", 0x0B: "h", 0x0C: "i", 0x0D: "f", 0x0E: "d"}


def idx_bytes(code: int, shape: tuple[int, ...], body: bytes) -> bytes:
    return b"\x00\x00" + bytes([code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


@cache
def idx_corpus() -> tuple[bytes, ...]:
    rng = np.random.default_rng(1)
    out = []
    for code, shape in ((0x08, (5, 4, 3)), (0x08, (7,)), (0x09, (2, 3)), (0x0B, (3, 2)), (0x0C, (4,)),
                        (0x0D, (2, 2, 2)), (0x0E, (3,))):
        count = int(np.prod(shape))
        body = rng.integers(0, 256, count * struct.calcsize(IDX_CODES[code]), dtype=np.uint8).tobytes()
        out.append(idx_bytes(code, shape, body))
    out += [gzip.compress(raw, mtime=0) for raw in out[:3]]
    labels = MNIST / "t10k-labels-idx1-ubyte.gz"
    if labels.exists():
        out.append(labels.read_bytes())
    return tuple(out)


@st.composite
def structured_idx(draw) -> bytes:
    """A header with any type code and up to 8 axes of hostile sizes, a body of some length, maybe gzipped."""
    code = draw(st.sampled_from(sorted(IDX_CODES)) | st.integers(0, 255))
    shape = draw(st.lists(st.integers(0, 8) | st.sampled_from([0xFFFFFFFF, 1 << 16, 1 << 31]), max_size=8))
    body = draw(st.binary(max_size=200))
    raw = idx_bytes(code, tuple(shape), body)
    return gzip.compress(raw, mtime=0) if draw(st.booleans()) else raw


def _idx_strategy() -> st.SearchStrategy:
    return st.one_of(st.binary(max_size=300), structured_idx(), mutated(idx_corpus()))


def run_idx(data: bytes | Mutant) -> str:
    """``read_idx`` of the bytes as a file (gzip is recognised by its magic, as for MNIST's .gz files)."""
    from data_prep.idx import read_idx

    return caffe_errors_only(lambda: read_idx(scratch("images-idx3-ubyte", bytes(data))))


# ------------------------------------------------------------------------------------------------
# LMDB files (data.mdb)
# ------------------------------------------------------------------------------------------------
@cache
def lmdb_corpus() -> tuple[bytes, ...]:
    """``data.mdb`` files as the project writes them: a few raw Datums in one leaf page, 300 label records
    (branch pages above the leaves), and image Datums larger than half a page (overflow pages)."""
    from data_prep.datum import array_to_datum, label_datum
    from data_prep.lmdb_io import LMDBWriter, caffe_key

    rng = np.random.default_rng(2)
    sets = [[array_to_datum(rng.integers(0, 256, (1, 6, 5), dtype=np.uint8), i) for i in range(5)],
            [label_datum([i % 250, 1, 2], i % 7) for i in range(300)],
            [array_to_datum(rng.integers(0, 256, (3, 24, 24), dtype=np.uint8), i) for i in range(6)]]
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for n, records in enumerate(sets):
            with LMDBWriter(Path(folder) / str(n), commit_every=50) as writer:
                for i, datum in enumerate(records):
                    writer.put(caffe_key(i), datum.SerializeToString())
            out.append((Path(folder) / str(n) / "data.mdb").read_bytes())
    return tuple(out)


def _lmdb_strategy() -> st.SearchStrategy:
    return st.one_of(mutated(lmdb_corpus(), max_ops=3),
                     st.builds(lambda data, cut: data[:cut], st.sampled_from(lmdb_corpus()), st.integers(0, 20000)))


_LMDB_CASES = [0]


def run_lmdb(data: bytes | Mutant) -> str:
    """The mutated ``data.mdb`` in a folder of its own (a new path, so no earlier verdict applies), read
    as ``egomotion data inspect`` reads a database: its length, every key and value, each value decoded."""
    import shutil

    from data_prep import lmdb_check
    from data_prep.datum import datum_shape, parse_datum
    from data_prep.lmdb_io import LMDBReader

    _LMDB_CASES[0] += 1
    path = scratch(f"lmdb-{_LMDB_CASES[0]}", b"")
    path.unlink()
    path.mkdir()
    lmdb_check.CACHE_ROOT = path.parent / "lmdb-verified"
    (path / "data.mdb").write_bytes(bytes(data))

    def read() -> None:
        with LMDBReader(path) as reader:
            len(reader)
            for key, value in reader.items():
                datum_shape(parse_datum(value, key), key=key)

    try:
        return caffe_errors_only(read)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
TARGETS: dict[str, Callable[[], Target]] = {
    "prototxt": lambda: Target("prototxt", _prototxt_strategy(), run_prototxt,
                               "read_net / read_solver + check_solver: random text, token soup, mutated conformance files"),
    "caffemodel": lambda: Target("caffemodel", _caffemodel_strategy(), run_caffemodel,
                                 "read_net of a .caffemodel, blob_to_array, copy_trained_layers into the golden net"),
    "datum": lambda: Target("datum", _datum_strategy(), run_datum,
                            "parse_datum + datum_to_array (native/colour/gray): raw, float, PNG, JPEG records"),
    "idx": lambda: Target("idx", _idx_strategy(), run_idx,
                          "read_idx: mutated headers and bodies, raw and gzip"),
    "lmdb": lambda: Target("lmdb", _lmdb_strategy(), run_lmdb,
                           "LMDBReader of a data.mdb: truncations, bit flips and other edits of real files"),
}


def warm_up() -> None:
    """Build the corpora and nets (and import the readers) before timing any case."""
    prototxt_corpus()
    golden_nets()
    datum_corpus()
    idx_corpus()
    lmdb_corpus()
    run_prototxt(("net", b"name: 'x'"))
    run_caffemodel(("", b""))
    run_datum(b"")
    run_idx(b"")
    run_lmdb(b"")
