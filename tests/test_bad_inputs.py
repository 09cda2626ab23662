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


def _category(name: str) -> str:
    return name.split("_", 1)[0]


def test_the_corpus_is_large_and_every_file_is_used():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert len(CASES) >= 100
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
