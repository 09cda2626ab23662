"""Issue 9: the bad-input corpus. Every case is one command line that must fail the way a user can act on.

``tests/bad_inputs/cases.tsv`` lists (name, command line, expected stderr line, paths that must not exist
afterwards); the files the commands read are the text files under ``tests/bad_inputs/`` and the binary ones
``make_corpus.py`` generates next to them in a temporary folder (the working directory of every command).
Each case runs through ``runner.cli.main`` in-process and must: return 2, print exactly one line on stderr
(``egomotion <verb>: error: …`` naming the file and place, or the layer and blob), no traceback, and leave
nothing behind at the paths a write command was asked to produce.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.layers.base import layer_class
from runner.cli import main

HERE = Path(__file__).parent / "bad_inputs"
sys.path.insert(0, str(HERE))
import make_corpus  # noqa: E402  (the generator lives beside its data)

sys.path.remove(str(HERE))


def _cases() -> list[tuple[str, str, str, list[str]]]:
    rows = []
    for n, line in enumerate((HERE / "cases.tsv").read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        assert len(fields) == 4, f"cases.tsv:{n}: expected 4 tab-separated fields, got {len(fields)}"
        name, command, expected, absent = fields
        rows.append((name, command, expected, [p for p in absent.split(",") if p]))
    return rows


CASES = _cases()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus.generate(tmp_path_factory.mktemp("bad_inputs") / "corpus")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _category(name: str) -> str:
    return name.split("_", 1)[0]


def test_the_corpus_is_large_and_every_file_is_used():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert len(CASES) > 300
    categories = {_category(n) for n in names}
    assert {"net", "solver", "caffemodel", "lmdb", "list", "idx", "kitti", "flag"} <= categories
    text = "\n".join(c[1] for c in CASES)
    corpus_text = text + "".join(p.read_text() for folder in make_corpus.TEXT_FOLDERS
                                 for p in (HERE / folder).iterdir() if p.suffix == ".prototxt")
    for folder in make_corpus.TEXT_FOLDERS:
        for path in (HERE / folder).iterdir():
            used = f"{folder}/{path.name}" in corpus_text or (folder == "poses" and f"kitti/{path.stem} " in text)
            assert used, f"{folder}/{path.name} is used by no case"


@pytest.mark.parametrize("name, command, expected, absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(name, command, expected, absent, corpus, monkeypatch, capsys):
    if name.startswith("gpu_") and _cuda_available():
        pytest.skip("--gpu is refused only where CUDA is not available")
    monkeypatch.chdir(corpus)
    rc = main(shlex.split(command))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("egomotion") and ": error: " in line, line
    if expected.startswith("re:"):
        assert re.match(expected[3:], line), f"{line!r} does not match {expected[3:]!r}"
    else:
        assert line.startswith(expected), f"\n got: {line}\nwant: {expected}"
    left = [p for p in absent if (corpus / p).exists()]
    assert not left, f"left behind after the error: {left}"


# -------------------------------------------------------------------------------------------------
# What the table cannot show
# -------------------------------------------------------------------------------------------------
def test_memory_check_adds_up_the_whole_net(monkeypatch):
    """Every blob fits but together they do not: refused at the layer where the total crosses the limit."""
    import converter.net as net_module
    from converter.io import parse_net

    monkeypatch.setattr(net_module, "available_memory", lambda: 1_000_000)
    text = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 100 dim: 1000 } } }\n' + "".join(
        f'layer {{ name: "r{i}" type: "ReLU" bottom: "{"x" if i == 0 else f"y{i - 1}"}" top: "y{i}" }}\n'
        for i in range(3))
    with pytest.raises(CaffeError, match=r"layer 'r1' \(ReLU\): the net needs at least 1,200,000 bytes .* for its "
                                         r"parameters and blobs up to this layer, more than this machine's memory"):
        net_module.CaffeNet(parse_net(text))


def test_memory_check_runs_before_any_filler(monkeypatch):
    """The fillers of a refused layer never run (they would allocate the blob)."""
    import converter.net as net_module
    from converter.io import parse_net

    calls = []
    monkeypatch.setattr(net_module, "fill", lambda *a, **k: calls.append(a))
    net = parse_net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3000 } } }\n'
                    'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                    'inner_product_param { num_output: 4000000000 } }')
    with pytest.raises(CaffeError, match=r"layer 'fc' \(InnerProduct\): learnable blob 0 of shape 4000000000x3000 "
                                         r"needs 48,000,000,000,000 bytes"):
        net_module.CaffeNet(net)
    assert not calls


def test_allow_python_layers_lasts_one_command(corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus)
    assert main(["check", "--allow-python-layers", "nets/python_layer.prototxt"]) == 2
    assert "'system' in module 'os' is not a class" in capsys.readouterr().err
    lp = caffe_pb2.LayerParameter(name="py", type="Python")
    with pytest.raises(CaffeError, match="Python layers run arbitrary code and are refused"):
        layer_class(lp)


def test_convert_imageset_append_keeps_what_was_committed(corpus, monkeypatch, tmp_path):
    """A fresh DB that stops on bad input is removed; an --append run keeps the records committed before."""
    from data_prep.lmdb_io import LMDBReader

    monkeypatch.chdir(corpus)
    db = tmp_path / "db"
    (tmp_path / "ok.txt").write_text("good.png 0\n")
    assert main(["data", "convert-imageset", "images/", str(tmp_path / "ok.txt"), str(db)]) == 0
    assert main(["data", "convert-imageset", "--append", "images/", "lists/truncated_png.txt", str(db)]) == 2
    with LMDBReader(db) as reader:
        assert len(reader) == 1


def test_no_code_unpickles_files():
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, no pickle.load."""
    root = Path(__file__).parent.parent
    bad = []
    for folder in ("converter", "runner", "data_prep", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if ("torch.load(" in code and "weights_only=True" not in code) or "allow_pickle=True" in code \
                        or re.search(r"\bpickle\.loads?\(", code) or "dill." in code:
                    bad.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_a_record_of_another_shape_mid_lmdb_stops_training_with_one_line(corpus, monkeypatch, capsys):
    """The second record of lmdb/mixed_channels is 1x8x8 where the first (which shaped the net) is 3x8x8:
    training stops with the record named, after its log lines, without a traceback or a snapshot."""
    monkeypatch.chdir(corpus)
    solver = corpus / "out" / "mixed_channels_solver.prototxt"
    solver.write_text('net: "nets/data_mixed_channels.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 2\n'
                      'snapshot_prefix: "out/mixed"\nrandom_seed: 1\n')
    assert main(["train", "--solver", str(solver)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "egomotion train: error: layer 'data' (Data): LMDB 'lmdb/mixed_channels': record '00000001': 1x8x8, but "
        "the first record '00000000', which shaped the net, is 3x8x8: every record must have one shape")
    assert not list((corpus / "out").glob("mixed_iter_*"))


def test_training_memory_counts_gradients_and_histories(corpus, monkeypatch, capsys):
    """A net whose weights and activations fit, but not with their gradients and Adam's two histories: refused
    before the solver allocates anything, with what was counted."""
    import converter.net as net_module

    monkeypatch.chdir(corpus)
    monkeypatch.setattr(net_module, "available_memory", lambda: 1_000_000)  # 100,000 weights: 400 kB
    (corpus / "out" / "fc_net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "data" top: "label" dummy_data_param { shape { dim: 2 dim: 1000 } '
        'shape { dim: 2 } } }\nlayer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param '
        '{ num_output: 100 bias_term: false } }\nlayer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" '
        'bottom: "label" top: "loss" }\n')
    # weights 400,000 bytes; activations 8,812 (data 8,000, label 8, fc 800, loss 4). SGD: 3 copies of the
    # weights + the larger of the pass (2 x 8,812) and a snapshot (weights + 1 history) = 2,000,000; Adam: 4
    # copies + a snapshot with 2 histories = 2,800,000
    for solver_type, copies, need in (("SGD", 3, "2,000,000"), ("Adam", 4, "2,800,000")):
        solver = corpus / "out" / f"fc_{solver_type}.prototxt"
        solver.write_text(f'net: "out/fc_net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 1\n'
                          f'type: "{solver_type}"\nsnapshot_prefix: "out/fc_{solver_type}"\n')
        assert main(["train", "--solver", str(solver)]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"egomotion train: error: training needs at least {need} bytes"), line
        assert f"400,000 bytes (0.0 GiB) of parameters x {copies} (weights, gradients, " in line
        assert "activations and their gradients 17,624 bytes" in line
        assert not list((corpus / "out").glob(f"fc_{solver_type}_iter_*"))


def test_mnist_pairs_refuses_a_count_the_disk_cannot_hold_before_reading_mnist(corpus, monkeypatch, capsys):
    import collections

    import data_prep.lmdb_io as lmdb_io

    monkeypatch.chdir(corpus)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(lmdb_io.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    argv = ["data", "mnist-pairs", "--mnist-dir", "no/such/mnist", "--count", "1000000", "out/mp", "out/ml"]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    # 1,000,000 records of 1,579 bytes (a 2x28x28 Datum) + 8-byte keys + 10-byte headers = 1.597 GB > 1 GB
    assert line.startswith("egomotion data: error: --count 1,000,000: 1,000,000 records of 1,579 bytes need at "
                           "least 1.6 GB, but the disk of "), line
    assert not (corpus / "out" / "mp").exists() and not (corpus / "out" / "ml").exists()
