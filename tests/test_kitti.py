"""KITTI pairs on the real sample (sequence 00, frames 0-150 of image_0, the full poses/00.txt).

Expected values are computed here independently: poses parsed as text, the motion with plain Python
arithmetic, the classes with a transcription of the thesis's C++ loop in float32, crops cut from the
PNG files with OpenCV.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from converter import caffe_pb2
from converter.errors import CaffeError
from data_prep import kitti
from data_prep.kitti import PairOptions, ZScore, classify, make_pairs, plan_pairs, read_manifest, relative_motion
from tests.golden import REFERENCE

SAMPLE = REFERENCE.parent / "data" / "kitti_odometry_00"
POSES = SAMPLE / "poses" / "00.txt"
FRAMES = SAMPLE / "sequences" / "00" / "image_0"

pytestmark = pytest.mark.skipif(not POSES.exists(), reason=f"{SAMPLE} is absent")


@functools.cache
def pose_lines() -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in POSES.read_text().splitlines()]


def hand_motion(i: int, j: int, frame: str) -> tuple[float, float, float]:
    """ΔX, ΔZ, rotation about Y of frames i -> j with plain Python (rows of [R | t] from the text)."""
    lines = pose_lines()
    a, b = lines[i], lines[j]
    r1 = [[a[4 * r + c] for c in range(3)] for r in range(3)]
    r2 = [[b[4 * r + c] for c in range(3)] for r in range(3)]
    d = [b[4 * r + 3] - a[4 * r + 3] for r in range(3)]
    if frame == "camera":  # R1 transposed times d
        d = [sum(r1[k][c] * d[k] for k in range(3)) for c in range(3)]
    m = [[sum(r2[k][r] * r1[k][c] for k in range(3)) for c in range(3)] for r in range(3)]  # R2ᵀ R1
    rot = math.atan2(m[0][2], math.sqrt(m[2][2] ** 2 + m[1][2] ** 2))
    return d[0], d[2], rot


def thesis_loop(v: float, minimum: float, step: float) -> int:
    """``while ((base += STEP) < v && bin < NUM_BINS) ++bin;`` with float base and value."""
    base, b, v = np.float32(minimum), 0, np.float32(v)
    while True:
        base = np.float32(float(base) + step)
        if not (base < v and b < 20):
            return b
        b += 1


def thesis_triple(dx: float, dz: float, rot: float) -> tuple[int, int, int]:
    return (thesis_loop(dx, -18, 1.8), thesis_loop(rot, -0.563987, 0.0536), thesis_loop(dz, -14, 1.3))


# ---------------------------------------------------------------------------------------------------
# Motion and classes of chosen pairs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame", ["camera", "world"])
@pytest.mark.parametrize("i, j", [(0, 7), (90, 97), (97, 90), (120, 121)])
def test_motion_of_chosen_pairs_equals_hand_computation(i, j, frame):
    p = kitti.read_poses(POSES)
    got = relative_motion(p[[i]], p[[j]], frame)[0]
    np.testing.assert_allclose(got, hand_motion(i, j, frame), rtol=0, atol=1e-9)


def test_known_values_straight_start_and_right_turn():
    p = kitti.read_poses(POSES)
    straight = relative_motion(p[[0]], p[[7]], "camera")[0]
    turn = relative_motion(p[[90]], p[[97]], "camera")[0]
    world_turn = relative_motion(p[[90]], p[[97]], "world")[0]
    # 0 -> 7: about 6 m forward, a little to the left, almost no turn.
    np.testing.assert_allclose(straight, [-0.328118, 6.007776, 0.014435], atol=1e-5)
    # 90 -> 97, in the right turn: R2ᵀR1 undoes the turn, so its Euler y is negative (y points down).
    np.testing.assert_allclose(turn, [0.237180, 3.409722, -0.126846], atol=1e-5)
    # In world coordinates the same motion reads differently: the car no longer faces the world's z.
    np.testing.assert_allclose(world_turn, [-0.003771, 3.416160, -0.126846], atol=1e-5)
    opts = PairOptions()
    classes, outside = classify(np.array([straight, turn]), opts)
    assert classes.tolist() == [[9, 10, 15], [10, 8, 13]]  # (x, rotation, z), by hand from the ranges
    assert classes.tolist() == [list(thesis_triple(*straight)), list(thesis_triple(*turn))]
    assert not outside.any()


def test_thesis_bins_at_range_edges():
    for axis, (minimum, step) in kitti.THESIS_BINS.items():
        edges = kitti.thesis_edges(minimum, step)
        probes = [-1e3, float(edges[0]), 1e3]
        for e in edges[1:]:
            probes += [float(e), float(np.nextafter(e, np.float32(-np.inf))), float(np.nextafter(e, np.float32(np.inf)))]
        got = kitti.thesis_class(np.array(probes), axis)
        assert got.tolist() == [thesis_loop(v, minimum, step) for v in probes], axis
        k = 7
        assert kitti.thesis_class(np.array([edges[k]]), axis)[0] == k - 1  # the loop's strict '<'
        assert kitti.thesis_class(np.array([np.nextafter(edges[k], np.float32(np.inf))]), axis)[0] == k
        assert kitti.thesis_class(np.array([edges[20]]), axis)[0] == 19  # the range's top edge is class 19
        assert kitti.thesis_class(np.array([np.nextafter(edges[20], np.float32(np.inf))]), axis)[0] == 20
    assert abs(float(kitti.thesis_edges(-18, 1.8)[20]) - 18) < 1e-4
    assert abs(float(kitti.thesis_edges(-14, 1.3)[20]) - 12) < 1e-4


def test_thesis_overflow_class_20_clamped_and_flagged():
    values = np.array([[18.5, 0.0, 0.0], [0.0, 12.5, 0.0], [0.0, 0.0, 0.6], [-100.0, -100.0, -1.0]])
    classes, outside = classify(values, PairOptions())
    assert classes.tolist() == [[19, 10, 10], [9, 10, 19], [9, 19, 10], [0, 0, 0]]
    assert outside.tolist() == [[True, False, False], [False, False, True], [False, True, False],
                                [False, False, False]]


def test_agrawal2015_bins_and_overflow_classes():
    z = ZScore(mean=[0.0, 0.0, 0.0], sd=[1.0, 1.0, 1.0], divisor=[1.0, 1.0, 1.0], pairs=0, source="")
    v = np.array([-10.5, -10.0, -9.999, -0.001, 0.0, 9.999, 10.0, 25.0])
    got = z.classes(np.stack([v, v, v], axis=1), max_offset=7)[:, 0]
    assert got.tolist() == [0, 1, 1, 10, 11, 20, 21, 21]
    got = z.classes(np.stack([v, v, v], axis=1) * 2, max_offset=14)[:, 0]  # bins widen with the frame gap
    assert got.tolist() == [0, 1, 1, 10, 11, 20, 21, 21]


def test_agrawal2015_statistics_from_consecutive_frames():
    steps = [(i, i + 1) for i in range(150)] + [(i + 1, i) for i in range(150)]  # both directions
    vals = np.array([hand_motion(a, b, "world") for a, b in steps])[:, [0, 2, 1]]  # x, rot_y, z
    seq = kitti.Sequence("00", {}, 151, kitti.read_poses(POSES)[:151], 0, 150)
    z = ZScore.fit([seq], "world")
    assert z.pairs == 2 * 150
    assert abs(z.mean[2]) < 0.01 * z.sd[2]  # forward and backward steps cancel
    np.testing.assert_allclose(z.mean, vals.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(z.sd, vals.std(axis=0), atol=1e-12)
    trans = max(vals[:, 0].std(), vals[:, 2].std())
    np.testing.assert_allclose(z.divisor, [trans, vals[:, 1].std(), trans], atol=1e-12)
    opts = PairOptions(labels="agrawal2015", translation_frame="world")
    classes, _ = classify(np.array([hand_motion(0, 7, "world")]), opts, z)
    v = np.array(hand_motion(0, 7, "world"))[[0, 2, 1]]
    z_values = (v - vals.mean(axis=0)) / np.array([trans, vals[:, 1].std(), trans])
    expected = [0 if t < -10 else 21 if t >= 10 else 1 + math.floor(t + 10) for t in z_values]
    assert classes[0].tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
def sample_sequence(first=0, last=150) -> kitti.Sequence:
    return kitti.Sequence("00", {"image_0": FRAMES}, 151, kitti.read_poses(POSES)[:151], first, last, (376, 1241))


def test_thesis_sampling_offsets_crops_flags_and_determinism():
    opts = PairOptions(cameras=("image_0",), pairs_per_sequence=3000, translation_frame="camera")
    pairs = plan_pairs([sample_sequence()], opts, np.random.default_rng(5))
    offsets = np.abs(pairs.frame1 - pairs.frame2)
    assert offsets.min() >= 1 and offsets.max() == 7
    assert sorted(set(offsets.tolist())) == [1, 2, 3, 4, 5, 6, 7]
    assert pairs.window[:, 0].max() <= 1241 - 227 and pairs.window[:, 1].max() <= 376 - 227
    assert pairs.window.min() >= 0 and (pairs.window[:, 2:] == 227).all()
    assert (pairs.sfa == 1).all()
    ends = pairs.frame1 == 0
    assert (pairs.frame2[ends] > 0).all()  # the first frame pairs to the right (never with itself)
    again = plan_pairs([sample_sequence()], opts, np.random.default_rng(5))
    assert (again.frame1 == pairs.frame1).all() and (again.window == pairs.window).all()
    expected = np.array([hand_motion(a, b, "camera") for a, b in zip(pairs.frame1[:50], pairs.frame2[:50],
                                                                        strict=True)])
    np.testing.assert_allclose(pairs.values[:50], expected, atol=1e-9)


def test_paper_sampling_allows_offset_zero():
    opts = PairOptions(cameras=("image_0",), sampling="paper", pairs_per_sequence=3000)
    offsets = np.abs(np.diff(np.stack(
        [(p := plan_pairs([sample_sequence()], opts, np.random.default_rng(1))).frame1, p.frame2]), axis=0))[0]
    counts = np.bincount(offsets, minlength=8)
    assert counts[0] > 0 and offsets.max() == 7
    assert counts[0] < counts[3] and counts[7] < counts[3]  # round(U*7): the two ends half as likely


@pytest.mark.parametrize("sampling", ["thesis", "paper"])
def test_sfa_flags(sampling):
    opts = PairOptions(task="sfa", sampling=sampling, cameras=("image_0",), pairs_per_sequence=2000)
    pairs = plan_pairs([sample_sequence()], opts, np.random.default_rng(2))
    gap = np.abs(pairs.frame1 - pairs.frame2)
    assert ((gap <= 7) == (pairs.sfa == 1)).all()
    assert 0 < pairs.sfa.mean() < 1
    if sampling == "thesis":
        assert gap.min() >= 1 and gap.max() == 20
    else:
        assert abs(pairs.sfa.mean() - 0.5) < 0.05 and gap.max() > 20


def test_thesis_overflow_drop_counts_match_clamp():
    seq = sample_sequence()
    base = dict(task="sfa", cameras=("image_0",), pairs_per_sequence=2000, translation_frame="world")
    clamp = plan_pairs([seq], PairOptions(**base), np.random.default_rng(3))
    drop = plan_pairs([seq], PairOptions(**base, thesis_overflow="drop"), np.random.default_rng(3))
    assert clamp.overflow == drop.overflow and clamp.overflow["z"] > 0  # 20 frames can exceed 12 m
    _, outside = classify(clamp.values, PairOptions())
    assert drop.dropped == int(outside.any(axis=1).sum()) and len(drop) == 2000 - drop.dropped
    _, outside = classify(drop.values, PairOptions())
    assert not outside.any()


# ---------------------------------------------------------------------------------------------------
# The LMDBs and the manifest
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("kitti")
    opts = PairOptions(cameras=("image_0",), total_pairs={"train": 150, "val": 40}, seed=11,
                       translation_frame="camera")
    report = make_pairs(SAMPLE, out, opts, train="00:0-119", val="00:120-150", echo=lambda _: None)
    return out, report


def read_db(path: Path) -> list[tuple[bytes, caffe_pb2.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(k, caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    return items


@pytest.mark.parametrize("split, first, last, n", [("train", 0, 119, 150), ("val", 120, 150, 40)])
def test_manifest_rows_equal_independent_labels(made, split, first, last, n):
    out, report = made
    rows = read_manifest(out / f"pairs_{split}.tsv")
    assert len(rows) == n == report["splits"][split]["pairs"]
    assert [r["key"] for r in rows] == [f"{i:08d}" for i in range(n)]
    for r in rows:
        f1, f2 = int(r["frame1"]), int(r["frame2"])
        assert first <= f1 <= last and first <= f2 <= last and 1 <= abs(f1 - f2) <= 7
        dx, dz, rot = hand_motion(f1, f2, "camera")
        assert abs(float(r["dx"]) - dx) < 1e-6 and abs(float(r["dz"]) - dz) < 1e-6
        assert abs(float(r["rot_y"]) - rot) < 1e-6
        assert (int(r["class_x"]), int(r["class_rot_y"]), int(r["class_z"])) == thesis_triple(dx, dz, rot)
        assert int(r["sfa"]) == int(abs(f1 - f2) <= 7)
    hist = report["splits"][split]["histogram"]
    assert hist["z"] == np.bincount([int(r["class_z"]) for r in rows], minlength=20).tolist()


@pytest.mark.parametrize("split", ["train", "val"])
def test_lmdb_keys_aligned_labels_and_crops(made, split):
    out, _ = made
    rows = read_manifest(out / f"pairs_{split}.tsv")
    images = read_db(out / f"pairs_{split}_lmdb")
    labels = read_db(out / f"pairs_{split}_labels_lmdb")
    assert [k for k, _ in images] == [k for k, _ in labels] == [r["key"].encode() for r in rows]
    for (_, lab), r in zip(labels, rows, strict=True):
        assert (lab.channels, lab.height, lab.width) == (3, 1, 1)
        assert list(lab.data) == [int(r["class_x"]), int(r["class_rot_y"]), int(r["class_z"])]
    for (_, img), r in list(zip(images, rows, strict=True))[:12]:
        assert (img.channels, img.height, img.width) == (2, 227, 227) and not img.encoded
        assert img.label == int(r["sfa"])
        x, y = int(r["crop_x"]), int(r["crop_y"])
        data = np.frombuffer(img.data, np.uint8).reshape(2, 227, 227)
        for c, f in enumerate((r["frame1"], r["frame2"])):
            frame = cv2.imread(str(FRAMES / f"{int(f):06d}.png"), cv2.IMREAD_UNCHANGED)
            assert (data[c] == frame[y:y + 227, x:x + 227]).all()  # the same window in both frames


def test_colour_full_frames_and_no_pose_refusal(tmp_path):
    opts = PairOptions(cameras=("image_0",), mode="color", store="full", total_pairs={"train": 3}, seed=1)
    make_pairs(SAMPLE, tmp_path / "full", opts, train="00:0-20", val="none", echo=lambda _: None)
    (key, img), = read_db(tmp_path / "full" / "pairs_train_lmdb")[:1]
    assert (img.channels, img.height, img.width) == (6, 376, 1241)
    r = read_manifest(tmp_path / "full" / "pairs_train.tsv")[0]
    data = np.frombuffer(img.data, np.uint8).reshape(6, 376, 1241)
    frame = cv2.imread(str(FRAMES / f"{int(r['frame2']):06d}.png"), cv2.IMREAD_COLOR)
    assert (data[3:] == frame.transpose(2, 0, 1)).all()

    root = tmp_path / "kitti" / "sequences" / "11" / "image_0"
    root.mkdir(parents=True)
    for i in range(30):
        cv2.imwrite(str(root / f"{i:06d}.png"), np.full((240, 240), i, np.uint8))
    with pytest.raises(CaffeError, match="00-10"):
        make_pairs(tmp_path / "kitti", tmp_path / "o", PairOptions(cameras=("image_0",)), train="11", val="none")
    report = make_pairs(tmp_path / "kitti", tmp_path / "sfa", PairOptions(task="sfa", cameras=("image_0",),
                        pairs_per_sequence=20), train="11", val="none", echo=lambda _: None)
    assert report["splits"]["train"]["label_lmdb"] is None and report["splits"]["train"]["pairs"] == 20
    with pytest.raises(CaffeError, match="image_0"):
        make_pairs(tmp_path / "kitti", tmp_path / "o2", PairOptions(cameras=("image_2",)), train="11", val="none")


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(CaffeError, match="cvlibs"):
        kitti.find_root(tmp_path)
    with pytest.raises(CaffeError, match="NN-MM"):
        kitti.parse_ranges("00-xx")
    with pytest.raises(CaffeError, match="overlap"):
        make_pairs(SAMPLE, tmp_path / "o", PairOptions(cameras=("image_0",)), train="00:0-100", val="00:100-150")
    with pytest.raises(CaffeError, match="frames 0-400"):
        make_pairs(SAMPLE, tmp_path / "o", PairOptions(cameras=("image_0",)), train="00:0-400", val="none")
    assert kitti.parse_ranges("00-02,05:10-20") == [kitti.Range("00"), kitti.Range("01"), kitti.Range("02"),
                                                   kitti.Range("05", 10, 20)]


# ---------------------------------------------------------------------------------------------------
# Command line, nets, plots
# ---------------------------------------------------------------------------------------------------
def test_cli_kitti_pairs(tmp_path, monkeypatch, capsys):
    from runner.cli import main

    monkeypatch.delenv("KITTI_DIR", raising=False)
    assert main(["data", "kitti-pairs", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "KITTI_DIR" in err and "cvlibs.net" in err
    monkeypatch.setenv("KITTI_DIR", str(SAMPLE))
    assert main(["data", "kitti-pairs", "--out", str(tmp_path / "b"), "--camera", "image_0", "--train", "00:0-30",
                 "--val", "none", "--train-pairs", "5", "--labels", "agrawal2015", "--translation-frame", "world"]) == 0
    out = capsys.readouterr().out
    assert "train: 5 pairs (2-channel)" in out and "overflow classes 0/21" in out
    rows = read_manifest(tmp_path / "b" / "pairs_train.tsv")
    assert len(rows) == 5 and all(0 <= int(r["class_z"]) <= 21 for r in rows)
    assert main(["data", "kitti-pairs", "--out", str(tmp_path / "b"), "--camera", "image_0", "--train", "00:0-30",
                 "--val", "none", "--train-pairs", "5"]) == 2  # the LMDBs exist: --overwrite is needed
    assert "--overwrite" in capsys.readouterr().err


def test_prototxts_build_and_the_deploy_tower_takes_the_egomotion_weights(tmp_path):
    import torch

    from converter.io import filter_net, net_state, read_net
    from converter.net import CaffeNet
    from converter.weights import load_weights, save_weights

    protos = Path(__file__).resolve().parents[1] / "prototxt" / "kitti"
    shapes = {"pairs": (1, 6, 227, 227), "sim": (1,), "motion": (1, 3, 1, 1)}
    ego = CaffeNet(filter_net(read_net(protos / "egomotion_train_val.prototxt"), net_state("TRAIN")), shapes)
    assert ego.blob_shapes["concat"] == (1, 512, 13, 13) and ego.blob_shapes["conv7"] == (1, 128, 2, 2)
    assert [ego.blob_shapes[f"fc{a}"] for a in "xyz"] == [(1, 20)] * 3
    sfa = CaffeNet(filter_net(read_net(protos / "sfa_train_val.prototxt"), net_state("TRAIN")), shapes)
    assert sfa.blob_shapes["fc100"] == sfa.blob_shapes["fc100_p"] == (1, 100)
    save_weights(ego, tmp_path / "ego.caffemodel")
    deploy = CaffeNet(read_net(protos / "bcnn_deploy.prototxt"))
    ignored = load_weights(deploy, tmp_path / "ego.caffemodel")
    assert not {f"conv{k}" for k in range(1, 6)} & set(ignored) and "conv1_p" in ignored
    by_name = {lp.name: uses for lp, uses in zip(ego.layer_params, ego.blob_uses, strict=True)}
    for lp, uses in zip(deploy.layer_params, deploy.blob_uses, strict=True):
        for u, e in zip(uses, by_name.get(lp.name, []), strict=True):
            assert torch.equal(deploy.params[u.learnable], ego.params[e.learnable])
    assert {f"pool{k}" for k in (1, 2, 5)} | {"norm1", "norm2", "conv5"} <= set(deploy.blob_shapes)


def test_plot_heads_writes_a_png(tmp_path):
    from runner.kitti_cli import main

    (tmp_path / "train.csv").write_text("iter,seconds,phase,name,value\n0,1,train,loss_x,3\n10,2,train,loss_x,2\n"
                                        "0,1,train,accuracy_x,0.1\n10,2,train,accuracy_x,0.4\n0,1,train,lr,0.001\n")
    assert main(["plot-heads", str(tmp_path / "train.csv"), "-o", str(tmp_path / "h.png")]) == 0
    assert cv2.imread(str(tmp_path / "h.png")) is not None
    assert main(["plot-heads", str(tmp_path / "absent.csv"), "-o", str(tmp_path / "x.png")]) == 2


def test_cli_and_library_defaults_are_the_schemas():
    """`egomotion data kitti-pairs`, PairOptions and make_pairs take every default from KittiPairsParameter
    (converter/experiment.proto): changing one there changes all three; none restates a value."""
    import argparse
    import dataclasses

    from converter import experiment_pb2
    from data_prep import kitti
    from runner.kitti_cli import add_kitti_parsers

    schema = experiment_pb2.KittiPairsParameter()
    parser = argparse.ArgumentParser()
    add_kitti_parsers(parser.add_subparsers())
    args = vars(parser.parse_args(["kitti-pairs", "--out", "x"]))
    for field in schema.DESCRIPTOR.fields:
        if field.name in ("env", "train_pairs", "val_pairs"):
            continue
        assert args[field.name] == getattr(schema, field.name), field.name
    options = {f.name: f.default for f in dataclasses.fields(kitti.PairOptions) if f.default is not dataclasses.MISSING}
    assert options["translation_frame"] == schema.translation_frame == "world"  # the thesis's frame
    assert options["cameras"] == (schema.camera,) and options["crop"] == schema.crop
    assert kitti.THESIS_SPLIT == (schema.train, schema.val)
