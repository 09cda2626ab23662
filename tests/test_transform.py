"""DataTransformer: Caffe's golden TEST-phase outputs, and Caffe's per-element loop written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import write_blobproto
from data_prep.transform import Transformer
from tests.golden import require_golden

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _tp(**kw) -> caffe_pb2.TransformationParameter:
    mean_value = kw.pop("mean_value", [])
    tp = caffe_pb2.TransformationParameter(**kw)
    tp.mean_value.extend(mean_value)
    return tp


def caffe_loop(datum: np.ndarray, crop: int, h_off: int, w_off: int, mirror: bool, scale: float,
               mean: np.ndarray | None = None, mean_values: list[float] | None = None) -> np.ndarray:
    """data_transformer.cpp Transform(const Datum&, Dtype*), element by element, in float32."""
    channels, datum_h, datum_w = datum.shape
    height, width = (crop, crop) if crop else (datum_h, datum_w)
    flat = datum.ravel()
    mean_flat = None if mean is None else mean.ravel()
    out = np.zeros(channels * height * width, dtype=np.float32)
    s = np.float32(scale)
    for c in range(channels):
        for h in range(height):
            for w in range(width):
                data_index = (c * datum_h + h_off + h) * datum_w + w_off + w
                top_index = (c * height + h) * width + ((width - 1 - w) if mirror else w)
                x = np.float32(flat[data_index])
                if mean_flat is not None:
                    out[top_index] = (x - mean_flat[data_index]) * s
                elif mean_values:
                    out[top_index] = (x - np.float32(mean_values[c])) * s
                else:
                    out[top_index] = x * s
    return out.reshape(channels, height, width)


def test_golden_transformer_case_test_phase():
    """Caffe's Data layers in TEST: centre crop 48 of 64 (offset 8, 8) minus mean_file at that offset,
    times 0.017; mean_value 104 117 123 times 0.017; untransformed."""
    case = require_golden() / "transformer"
    images = np.load(case / "decoded" / "images.npy")
    crop = Transformer(_tp(crop_size=48, mean_file=str(case / "mean.binaryproto"), scale=0.017), TEST)
    np.testing.assert_array_equal(crop(images), np.load(case / "blobs" / "data_crop.npy"))
    mv = Transformer(_tp(mean_value=[104, 117, 123], scale=0.017), TEST)
    np.testing.assert_array_equal(mv(images), np.load(case / "blobs" / "data_mv.npy"))
    np.testing.assert_array_equal(Transformer(_tp(), TEST)(images), np.load(case / "blobs" / "data_raw.npy"))
    assert crop.output_shape((3, 64, 64)) == (3, 48, 48)


def test_mean_file_at_crop_position_then_scale_then_mirror(tmp_path):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 3, 9, 11), dtype=np.uint8)
    mean = rng.uniform(0, 255, (3, 9, 11)).astype(np.float32)
    write_blobproto(tmp_path / "mean.binaryproto", mean[None])
    t = Transformer(_tp(crop_size=4, mirror=True, scale=0.25, mean_file=str(tmp_path / "mean.binaryproto")), TRAIN)
    mirror = np.array([True, False, True, False, True])
    h_off, w_off = np.array([0, 5, 2, 3, 1]), np.array([7, 0, 3, 6, 2])
    got = t.apply(batch, mirror, h_off, w_off)
    for i in range(5):
        want = caffe_loop(batch[i], 4, h_off[i], w_off[i], mirror[i], 0.25, mean=mean)
        np.testing.assert_array_equal(got[i], want)
    # the order matters: (x - mean) * scale, not x * scale - mean
    x, m = float(batch[1, 0, 5, 0]), float(mean[0, 5, 0])
    assert got[1, 0, 0, 0] == np.float32((np.float32(x) - np.float32(m)) * np.float32(0.25))
    assert got[0, 0, 0, 3] == (np.float32(batch[0, 0, 0, 7]) - mean[0, 0, 7]) * np.float32(0.25)  # mirrored


def test_mean_values_one_or_per_channel_and_float_data():
    rng = np.random.default_rng(1)
    batch = rng.uniform(-5, 300, (3, 3, 5, 5)).astype(np.float32)
    for values in ([10.5], [1, 2, 3]):
        t = Transformer(_tp(mean_value=values, scale=0.5, crop_size=3), TEST)
        got = t(batch)
        for i in range(3):
            want = caffe_loop(batch[i], 3, 1, 1, False, 0.5, mean_values=values * (3 // len(values)))
            np.testing.assert_array_equal(got[i], want)


def test_test_phase_centre_crop_is_floor_and_train_crop_is_random_in_range():
    batch = np.zeros((400, 1, 10, 7), np.uint8)
    t_test = Transformer(_tp(crop_size=4), TEST)
    assert not t_test.random
    _, h, w = t_test.draw(None, np.full(3, 10), np.full(3, 7))
    assert h.tolist() == [3] * 3 and w.tolist() == [1] * 3  # (10-4)//2, (7-4)//2
    t_train = Transformer(_tp(crop_size=4), TRAIN)
    mirror, h, w = t_train.draw(np.random.default_rng(2), np.full(400, 10), np.full(400, 7))
    assert not mirror.any()
    assert set(h.tolist()) == set(range(7)) and set(w.tolist()) == set(range(4))
    assert t_train(batch, np.random.default_rng(3)).shape == (400, 1, 4, 4)


def test_mirror_is_random_in_test_phase_too():
    batch = np.tile(np.arange(6, dtype=np.uint8), (200, 1, 1, 1))
    out = Transformer(_tp(mirror=True), TEST)(batch, np.random.default_rng(4))
    flipped = out[:, 0, 0, 0] == 5
    assert 50 < flipped.sum() < 150
    np.testing.assert_array_equal(out[flipped, 0, 0], np.tile(np.arange(5, -1, -1), (flipped.sum(), 1)))
    np.testing.assert_array_equal(out[~flipped, 0, 0], np.tile(np.arange(6), ((~flipped).sum(), 1)))


def test_same_generator_state_same_output():
    batch = np.random.default_rng(5).integers(0, 256, (8, 3, 12, 12), dtype=np.uint8)
    t = Transformer(_tp(crop_size=8, mirror=True, scale=0.1), TRAIN)
    a = t(batch, np.random.default_rng([1, 2, 3]))
    b = t(batch, np.random.default_rng([1, 2, 3]))
    c = t(batch, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_inputs_of_different_sizes_need_a_crop():
    items = [np.full((3, 10, 12), 1, np.uint8), np.full((3, 8, 9), 2, np.uint8)]
    out = Transformer(_tp(crop_size=6), TEST)(items)
    assert out.shape == (2, 3, 6, 6) and out[0].max() == 1 and out[1].min() == 2
    with pytest.raises(CaffeError, match="differ in shape"):
        Transformer(_tp(), TEST)(items)


def test_bad_parameters_are_one_line_errors(tmp_path):
    write_blobproto(tmp_path / "m.binaryproto", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(CaffeError, match="mean_file and mean_value"):
        Transformer(_tp(mean_file=str(tmp_path / "m.binaryproto"), mean_value=[1]), TEST)
    t = Transformer(_tp(mean_file=str(tmp_path / "m.binaryproto")), TEST, "layer 'd' (Data)")
    with pytest.raises(CaffeError, match="layer 'd'.*3x8x8 but the data is 3x9x9"):
        t.output_shape((3, 9, 9))
    with pytest.raises(CaffeError, match="1 mean_value or as many as channels"):
        Transformer(_tp(mean_value=[1, 2]), TEST).output_shape((3, 4, 4))
    with pytest.raises(CaffeError, match="crop_size 5 is larger than the 1x4x6"):
        Transformer(_tp(crop_size=5), TEST).output_shape((1, 4, 6))
    with pytest.raises(CaffeError, match="force_color and force_gray"):
        Transformer(_tp(force_color=True, force_gray=True), TEST)
    with pytest.raises(CaffeError):
        Transformer(_tp(mean_file=str(tmp_path / "absent.binaryproto")), TEST)
