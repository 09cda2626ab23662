"""Issue 2: the schema, prototxt/caffemodel I/O, Caffe's upgrades and NetState filtering."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import (
    array_to_blob,
    blob_shape,
    filter_net,
    net_state,
    read_blobproto,
    read_net,
    read_solver,
    write_blobproto,
    write_message,
)
from tests.golden import REFERENCE

CONFORMANCE = REFERENCE / "conformance"
LENET = REFERENCE.parent / "data" / "caffe_models" / "lenet_mnist" / "lenet_iter_10000.caffemodel"


def conformance(name: str) -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"{CONFORMANCE} is absent")
    return CONFORMANCE / name


def graph(net: caffe_pb2.NetParameter) -> list[tuple]:
    """What makes two nets the same net: names, types, wiring, phases and param specs."""
    out = []
    for lp in net.layer:
        phases = tuple(caffe_pb2.Phase.Name(r.phase) for r in lp.include if r.HasField("phase"))
        params = tuple((p.name, p.lr_mult, p.decay_mult) for p in lp.param)
        out.append((lp.name, lp.type, tuple(lp.bottom), tuple(lp.top), phases, params))
    return out


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFORMANCE / "*.prototxt"))) or ["absent"])
def test_every_conformance_file_parses(path):
    if path == "absent":
        pytest.skip("conformance folder absent")
    if "solver" in Path(path).name:
        solver = read_solver(path)
        assert solver.base_lr > 0 and solver.type == "SGD"
    else:
        net = read_net(path)
        assert len(net.layer) > 5 and not len(net.layers)


def test_v1_lenet_upgrades_to_the_v2_lenet_graph():
    v1 = read_net(conformance("10_lenet_train_test_V1_v0.9999.prototxt"))
    expected = [
        ("mnist", "Data", (), ("data", "label"), ("TRAIN",), ()),
        ("mnist", "Data", (), ("data", "label"), ("TEST",), ()),
        ("conv1", "Convolution", ("data",), ("conv1",), (), (("", 1.0, 1.0), ("", 2.0, 1.0))),
        ("pool1", "Pooling", ("conv1",), ("pool1",), (), ()),
        ("conv2", "Convolution", ("pool1",), ("conv2",), (), (("", 1.0, 1.0), ("", 2.0, 1.0))),
        ("pool2", "Pooling", ("conv2",), ("pool2",), (), ()),
        ("ip1", "InnerProduct", ("pool2",), ("ip1",), (), (("", 1.0, 1.0), ("", 2.0, 1.0))),
        ("relu1", "ReLU", ("ip1",), ("ip1",), (), ()),
        ("ip2", "InnerProduct", ("ip1",), ("ip2",), (), (("", 1.0, 1.0), ("", 2.0, 1.0))),
        ("accuracy", "Accuracy", ("ip2", "label"), ("accuracy",), ("TEST",), ()),
        ("loss", "SoftmaxWithLoss", ("ip2", "label"), ("loss",), (), ()),
    ]
    assert graph(v1) == expected
    assert graph(read_net(conformance("01_lenet_train_test.prototxt"))) == expected
    # the deprecated data_param { scale } moved into transform_param; the backend stays the default
    assert v1.layer[0].transform_param.scale == pytest.approx(0.00390625)
    assert not v1.layer[0].data_param.HasField("scale")
    assert v1.layer[0].data_param.backend == caffe_pb2.DataParameter.LEVELDB


def test_v1_siamese_upgrades_with_named_shared_params():
    v1 = read_net(conformance("11_mnist_siamese_train_test_V1_rc.prototxt"))
    v2 = read_net(conformance("03_mnist_siamese_train_test.prototxt"))
    assert [g[:4] for g in graph(v1)] == [g[:4] for g in graph(v2)]
    by_name = {lp.name: lp for lp in v1.layer}
    for layer in ("conv1", "conv1_p"):
        specs = [(p.name, p.lr_mult) for p in by_name[layer].param]
        assert specs == [("conv1_w", 1.0), ("conv1_b", 2.0)]
    assert by_name["loss"].type == "ContrastiveLoss"
    assert by_name["slice_pair"].slice_param.slice_dim == 1


def test_legacy_input_fields_become_an_input_layer():
    text = 'name: "d"\ninput: "data"\ninput_dim: 10\ninput_dim: 3\ninput_dim: 227\ninput_dim: 227\n' \
           'input: "im_info"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 1\ninput_dim: 1\n' \
           'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n'
    from converter.io import parse_net

    net = parse_net(text)
    assert [lp.type for lp in net.layer] == ["Input", "ReLU"]
    assert net.layer[0].name == "input" and list(net.layer[0].top) == ["data", "im_info"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[10, 3, 227, 227], [1, 3, 1, 1]]
    assert not len(net.input) and not len(net.input_dim)


def test_v0_net_upgrades_and_folds_padding_layers():
    text = """name: "v0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 8 kernelsize: 5 stride: 2 blobs_lr: 1 blobs_lr: 2
                 weight_decay: 1 weight_decay: 0 } bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
"""
    from converter.io import parse_net

    net = parse_net(text)
    assert [(lp.name, lp.type, list(lp.bottom)) for lp in net.layer] == [
        ("input", "Input", []), ("conv1", "Convolution", ["data"]), ("relu1", "ReLU", ["conv1"]),
        ("pool1", "Pooling", ["conv1"])]
    conv = net.layer[1].convolution_param
    assert (conv.num_output, list(conv.kernel_size), list(conv.stride), list(conv.pad)) == (8, [5], [2], [2])
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[1].param] == [(1, 1), (2, 0)]
    assert net.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.AVE


def test_solver_type_enum_and_snapshot_prefix_upgrade(tmp_path):
    path = tmp_path / "my_solver.prototxt"
    path.write_text('net: "n.prototxt"\nbase_lr: 0.1\nsolver_type: NESTEROV\n')
    solver = read_solver(path)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.snapshot_prefix == str(tmp_path / "my_solver")
    (tmp_path / "snaps").mkdir()
    path.write_text(f'net: "n.prototxt"\nbase_lr: 0.1\nsnapshot_prefix: "{tmp_path / "snaps"}"\n')
    assert read_solver(path).snapshot_prefix == str(tmp_path / "snaps" / "my_solver")


def test_text_and_binary_round_trips(tmp_path):
    for name in ("05_bvlc_reference_caffenet_train_val.prototxt", "08_bvlc_googlenet_train_val.prototxt",
                 "12_thesis_siamese_mnist_egomotion.prototxt"):
        net = read_net(conformance(name))
        write_message(tmp_path / "a.prototxt", net)
        again = read_net(tmp_path / "a.prototxt")
        assert again == net
        write_message(tmp_path / "a.caffemodel", net)
        assert read_net(tmp_path / "a.caffemodel") == net
    assert not list(tmp_path.glob("*.partial")), "atomic writes leave no temporaries"


def test_real_lenet_caffemodel_loads():
    if not LENET.exists():
        pytest.skip(f"{LENET} is absent")
    net = read_net(LENET)
    shapes = {lp.name: [blob_shape(b) for b in lp.blobs] for lp in net.layer if len(lp.blobs)}
    assert shapes == {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
                      "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}


def test_phase_filtering_of_lenet():
    net = read_net(conformance("01_lenet_train_test.prototxt"))
    train = filter_net(net, net_state("TRAIN"))
    test = filter_net(net, net_state("TEST"))
    assert [lp.name for lp in train.layer] == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1",
                                               "ip2", "loss"]
    assert [lp.name for lp in test.layer] == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1",
                                              "ip2", "accuracy", "loss"]
    assert train.layer[0].data_param.batch_size == 64 and test.layer[0].data_param.batch_size == 100


def test_stage_and_level_rules():
    text = """name: "s"
layer { name: "always" type: "ReLU" }
layer { name: "train_only" type: "ReLU" include { phase: TRAIN } }
layer { name: "on_train" type: "ReLU" include { phase: TEST stage: "test-on-train" } }
layer { name: "not_on_train" type: "ReLU" include { phase: TEST not_stage: "test-on-train" } }
layer { name: "level2" type: "ReLU" include { min_level: 2 } }
layer { name: "excluded_test" type: "ReLU" exclude { phase: TEST } }
"""
    from converter.io import parse_net

    net = parse_net(text)

    def names(*args, **kw):
        return [lp.name for lp in filter_net(net, net_state(*args, **kw)).layer]

    assert names("TEST") == ["always", "not_on_train"]
    assert names("TEST", stages=["test-on-train"]) == ["always", "on_train"]
    assert names("TRAIN", level=2) == ["always", "train_only", "level2", "excluded_test"]


def test_binaryproto_mean_round_trip(tmp_path):
    mean = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4) / 7
    write_blobproto(tmp_path / "mean.binaryproto", mean)
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 2, 3, 4)  # compute_image_mean's layout
    np.testing.assert_array_equal(read_blobproto(tmp_path / "mean.binaryproto"), mean)
    bad = array_to_blob(np.zeros((2, 2)))
    del bad.data[:1]
    (tmp_path / "bad.binaryproto").write_bytes(bad.SerializeToString())
    with pytest.raises(CaffeError, match="holds 3 values but its shape"):
        read_blobproto(tmp_path / "bad.binaryproto")


def test_text_format_prints_caffe_syntax():
    net = read_net(conformance("01_lenet_train_test.prototxt"))
    text = text_format.MessageToString(net)
    assert 'type: "Convolution"' in text and "include {\n    phase: TRAIN" in text


MALFORMED = Path(__file__).parent / "malformed"
EXPECTED_ERRORS = {
    "01_unclosed_brace.prototxt": '01_unclosed_brace.prototxt:6:8: Expected "}".',
    "02_unknown_field.prototxt":
        '02_unknown_field.prototxt:4:3: Message type "caffe.LayerParameter" has no field named "typo".',
    "03_negative_uint.prototxt":
        "03_negative_uint.prototxt:5:35: '  convolution_param { num_output: -3 }': Value out of range: -3",
    "04_bad_enum.prototxt": "04_bad_enum.prototxt:5:25: '  pooling_param { pool: MEDIAN }': Enum type "
                            '"caffe.PoolingParameter.PoolMethod" has no value named MEDIAN.',
    "05_string_for_int.prototxt": "05_string_for_int.prototxt:5:35: '  convolution_param { num_output: "
                                  "\"ten\" }': Couldn't parse integer: \"ten\"",
    "06_layer_and_layers.prototxt": "06_layer_and_layers.prototxt: mixes V2 'layer' and V1 'layers' fields; "
                                    "use one format (egomotion upgrade converts V1 files)",
    "07_bad_v1_enum.prototxt": "07_bad_v1_enum.prototxt:2:26: 'layers { name: \"b\" type: RELUX }': Enum type "
                               '"caffe.V1LayerParameter.LayerType" has no value named RELUX.',
    "08_extra_brace.prototxt": "08_extra_brace.prototxt:7:1: '}': Expected identifier or number, got }.",
    "09_unterminated_string.prototxt":
        "09_unterminated_string.prototxt:1:7: 'name: \"x': String missing ending quote: '\"x'",
    "10_unknown_solver_type_solver.prototxt": "10_unknown_solver_type_solver.prototxt: unknown solver type "
                                              "'Adamax' (one of SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)",
    "11_both_solver_types_solver.prototxt": "11_both_solver_types_solver.prototxt: both the old solver_type "
                                            "enum and the new type string are set",
    "12_string_field_number_solver.prototxt":
        "12_string_field_number_solver.prototxt:3:12: 'lr_policy: 7': Expected string but found: '7'",
    "13_short_input_dim.prototxt":
        "13_short_input_dim.prototxt: input 'data' needs 4 input_dim values (1 inputs, 3 input_dim)",
    "14_include_and_exclude.prototxt": "14_include_and_exclude.prototxt: layer 'a': specify either include "
                                       "rules or exclude rules, not both",
    "15_bad_phase.prototxt": "15_bad_phase.prototxt:5:20: '  include { phase: VALIDATE }': Enum type "
                             '"caffe.Phase" has no value named VALIDATE.',
    "16_bad_float.prototxt":
        "16_bad_float.prototxt:5:34: '  dropout_param { dropout_ratio: 0.5.5 }': Couldn't parse float: 0.5.5",
    "17_truncated.caffemodel": "17_truncated.caffemodel: not a valid binary NetParameter (Error parsing message "
                               "with type 'caffe.NetParameter')",
    "18_not_utf8.prototxt": "18_not_utf8.prototxt: not a text prototxt (byte 9 is not UTF-8); binary files "
                            "should end in .caffemodel/.binaryproto/.solverstate",
    "19_repeated_scalar.prototxt": "19_repeated_scalar.prototxt:7:52: Message type \"caffe.ReLUParameter\" should "
                                   "not have multiple \"negative_slope\" fields.",
    "20_unknown_layer_type.prototxt": "layer 'a' (Frobnicate): unsupported layer type; supported: ",
    "21_missing_bottom.prototxt": "layer 'r' (ReLU): unknown bottom blob 'dat' (no earlier layer produces it)",
    "22_duplicate_top.prototxt": "layer 'r2' (TanH): top blob 'y' is produced by multiple layers",
    "23_pad_not_less_than_kernel.prototxt": "layer 'p' (Pooling): ",
    "24_shared_param_shape_clash.prototxt": "layer 'c2' (Convolution): shared param 'w' has shape (4, 3, 5, 5) "
                                            "here but (4, 3, 3, 3) in its owner c1.0 (STRICT sharing)",
    "25_python_layer.prototxt": "layer 'py' (Python): Python layers run arbitrary code and are refused",
    "26_group_not_dividing.prototxt": "layer 'c' (Convolution): ",
    "27_duplicate_layer_name.prototxt": "layer 'r' (ReLU): a layer with this name already exists",
    "28_too_many_param_specs.prototxt": "layer 'c' (InnerProduct): 3 param specs given for 2 learnable blobs",
    "29_zero_input_dim.prototxt": "layer 'in' (Input): top 'data' has a non-positive dimension in shape (2, 0, 4)",
    "30_concat_unknown.prototxt": "layer 'c' (Concat): unknown bottom blob 'data2' (no earlier layer produces it)",
}


def test_the_malformed_corpus_is_complete():
    assert sorted(p.name for p in MALFORMED.iterdir()) == sorted(EXPECTED_ERRORS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_malformed_file_gives_one_clear_line(name, monkeypatch, capsys):
    from runner.cli import main

    monkeypatch.chdir(MALFORMED)
    assert main(["check", name]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    prefix = "egomotion check: error: "
    assert lines[0].startswith(prefix + EXPECTED_ERRORS[name]), lines[0]


def test_check_without_data_still_counts_tops_and_bottoms(tmp_path, capsys):
    """`egomotion check` of a net whose LMDB is absent (so no shapes): Caffe's blob counts are still checked."""
    from runner.cli import main

    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "Data" top: "x" top: "y" data_param { source: "absent_lmdb" batch_size: 2 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" top: "b" inner_product_param { num_output: 2 } }\n')
    assert main(["check", str(tmp_path / "net.prototxt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("layer 'ip' (InnerProduct): takes 1 top blob(s), got 2"), err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_take_their_mode_from_the_umask(tmp_path, umask, mode):
    """Snapshots, exports and means are written through a private temporary file (mkstemp: 0600); the
    file they become has the mode a plain open() gives under the process's umask."""
    from converter.io import atomic_write_bytes

    before = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "x.caffemodel", b"data")
    finally:
        os.umask(before)
    assert (tmp_path / "x.caffemodel").stat().st_mode & 0o777 == mode


def test_atomic_writes_keep_a_symlink_and_never_replace_a_special_file(tmp_path):
    """A snapshot written through a symbolic link lands where the link points (the link stays a link); a
    FIFO (or a device: `-o /dev/full` once replaced the device node with a file) is refused untouched."""
    import stat

    from converter.errors import CaffeError
    from converter.io import atomic_write_bytes

    (tmp_path / "real").mkdir()
    (tmp_path / "latest.caffemodel").symlink_to(tmp_path / "real" / "model.caffemodel")
    atomic_write_bytes(tmp_path / "latest.caffemodel", b"weights")
    assert (tmp_path / "latest.caffemodel").is_symlink()
    assert (tmp_path / "real" / "model.caffemodel").read_bytes() == b"weights"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CaffeError, match="exists and is not a regular file"):
        atomic_write_bytes(tmp_path / "fifo", b"x")
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)
