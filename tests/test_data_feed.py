"""NetFeeder / data_layer_shapes: Caffe's Data, ImageData and DummyData semantics end to end."""

from __future__ import annotations

import logging

import lmdb
import numpy as np
import pytest
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import filter_net, net_state, parse_net, read_net
from data_prep.datum import array_to_datum, label_datum
from data_prep.lmdb_io import RESTART_MESSAGE, LMDBWriter, caffe_key
from runner.data import NetFeeder, data_layer_shapes
from tests.golden import require_golden

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _net(text: str, phase: int = TRAIN) -> caffe_pb2.NetParameter:
    return filter_net(parse_net(text), net_state(phase))


def _data_layer(source, batch, transform="", name="d", tops=("data", "label"), backend="LMDB") -> str:
    top_lines = "".join(f'top: "{t}" ' for t in tops)
    return (f'layer {{ name: "{name}" type: "Data" {top_lines} transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" backend: {backend} batch_size: {batch} }} }}\n')


def _raw_records(db) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and labels of every record, read with the lmdb package and protobuf alone."""
    env = lmdb.open(str(db), readonly=True, lock=False)
    images, labels = [], []
    with env.begin() as txn:
        for _, value in txn.cursor():
            d = caffe_pb2.Datum()
            d.ParseFromString(value)
            images.append(np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width))
            labels.append(d.label)
    env.close()
    return np.stack(images), np.array(labels)


def test_golden_transformer_net_test_phase(monkeypatch):
    case = require_golden() / "transformer"
    monkeypatch.chdir(case)  # sources and the mean file are relative to the working directory, as in Caffe
    net = read_net("net.prototxt")
    shapes = {}
    for lp in net.layer:
        shapes.update(data_layer_shapes(lp, TEST))
    assert shapes == {"data_crop": (6, 3, 48, 48), "label_crop": (6,), "data_mv": (6, 3, 64, 64),
                      "label_mv": (6,), "data_raw": (6, 3, 64, 64), "label_raw": (6,)}
    with NetFeeder(net, TEST) as feeder:
        assert feeder.shapes == shapes
        batch = feeder.next()
    assert set(batch) == set(shapes)
    for top, value in batch.items():
        assert value.dtype == torch.float32
        np.testing.assert_array_equal(value.numpy(), np.load(case / "blobs" / f"{top}.npy"), err_msg=top)


def test_mnist_batches_in_key_order_wrapping_after_640(caplog):
    db = require_golden() / "_data" / "mnist_train_lmdb"
    images, labels = _raw_records(db)
    net = _net(_data_layer(db, 64, "scale: 0.00390625"))
    assert data_layer_shapes(net.layer[0], TRAIN) == {"data": (64, 1, 28, 28), "label": (64,)}
    with NetFeeder(net, TRAIN, seed=1) as feeder, caplog.at_level(logging.INFO, logger="runner.data"):
        for b in range(11):
            batch = feeder.next()
            idx = np.arange(64 * b, 64 * b + 64) % 640
            np.testing.assert_array_equal(batch["data"].numpy(), images[idx].astype(np.float32) * np.float32(1 / 256))
            np.testing.assert_array_equal(batch["label"].numpy(), labels[idx].astype(np.float32))
            restarts = [r.message for r in caplog.records].count(RESTART_MESSAGE)
            assert restarts == (1 if b >= 9 else 0), b  # logged once, while reading the 640th record
    assert batch["label"].shape == (64,)


def test_ranks_take_every_world_size_th_record_in_train_only():
    db = require_golden() / "_data" / "mnist_test_lmdb"
    images, _ = _raw_records(db)
    net = _net(_data_layer(db, 30))
    for rank in (0, 1, 2):
        with NetFeeder(net, TRAIN, rank=rank, world_size=3) as feeder:
            for b in range(4):  # 4 x 30 x 3 = 360 offsets: crosses the wrap at 200
                want = (3 * np.arange(30 * b, 30 * b + 30) + rank) % 200
                np.testing.assert_array_equal(feeder.next()["data"].numpy(), images[want].astype(np.float32))
    with NetFeeder(_net(_data_layer(db, 30), TEST), TEST, rank=1, world_size=3) as feeder:
        np.testing.assert_array_equal(feeder.next()["data"].numpy(), images[:30].astype(np.float32))


def test_image_and_label_lmdbs_with_equal_keys_stay_aligned(tmp_path):
    """The thesis layout: pairs (2 channels) in one LMDB, (x, y, z) class bytes in another, equal keys."""
    n = 7
    with LMDBWriter(tmp_path / "pairs") as pairs, LMDBWriter(tmp_path / "labels") as lbl:
        for i in range(n):
            pairs.put(caffe_key(i), array_to_datum(np.full((2, 4, 4), i, np.uint8), label=i % 2).SerializeToString())
            lbl.put(caffe_key(i), label_datum([i, i + 1, i + 2]).SerializeToString())
    net = _net(_data_layer(tmp_path / "pairs", 3, name="pair", tops=("pair", "sim")) +
               _data_layer(tmp_path / "labels", 3, name="lab", tops=("xyz",)))
    with NetFeeder(net, TRAIN, seed=0) as feeder:
        assert feeder.shapes == {"pair": (3, 2, 4, 4), "sim": (3,), "xyz": (3, 3, 1, 1)}
        for b in range(9):
            batch = feeder.next()
            ids = np.arange(3 * b, 3 * b + 3) % n
            np.testing.assert_array_equal(batch["pair"][:, 1, 2, 3].numpy(), ids)
            np.testing.assert_array_equal(batch["sim"].numpy(), ids % 2)
            np.testing.assert_array_equal(batch["xyz"][:, :, 0, 0].numpy(), np.stack([ids, ids + 1, ids + 2], 1))


def _random_net(db) -> caffe_pb2.NetParameter:
    return _net(_data_layer(db, 16, "crop_size: 20 mirror: true scale: 0.5 mean_value: 33"))


def test_seeded_random_transforms_are_reproducible_and_worker_independent():
    db = require_golden() / "_data" / "mnist_test_lmdb"
    images, _ = _raw_records(db)

    def run(seed, workers):
        with NetFeeder(_random_net(db), TRAIN, seed=seed, workers=workers) as feeder:
            return [feeder.next()["data"].numpy() for _ in range(3)]

    a, b, c = run(5, 0), run(5, 2), run(6, 0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    for workers in (0, 1):  # skip() (resuming) lands on the same batch as reading through
        with NetFeeder(_random_net(db), TRAIN, seed=5, workers=workers) as feeder:
            feeder.next()
            feeder.skip(1)
            np.testing.assert_array_equal(feeder.next()["data"].numpy(), a[2])
    # every output is some 20x20 crop of its record, possibly mirrored, (x - 33) * 0.5
    first = a[0][0, 0]
    src = (images[0, 0].astype(np.float32) - 33) * np.float32(0.5)
    windows = [src[h:h + 20, w:w + 20] for h in range(9) for w in range(9)]
    assert any(np.array_equal(first, win) or np.array_equal(first, win[:, ::-1]) for win in windows)


def test_dummy_data_constant_default_and_random_fillers():
    net = _net("""
        layer { name: "z" type: "DummyData" top: "zeros" dummy_data_param { shape { dim: 2 dim: 3 } } }
        layer { name: "c" type: "DummyData" top: "ones" top: "g"
                dummy_data_param { shape { dim: 4 } shape { dim: 5 dim: 2 }
                                   data_filler { type: "constant" value: 1 } data_filler { type: "gaussian" } } }
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }
    """)
    with NetFeeder(net, TRAIN, seed=3) as feeder:
        b0, b1 = feeder.next(), feeder.next()
    with NetFeeder(net, TRAIN, seed=3) as feeder:
        again = feeder.next()
    assert set(b0) == {"zeros", "ones", "g"}  # Input tops are the caller's
    assert torch.equal(b0["zeros"], torch.zeros(2, 3)) and torch.equal(b1["ones"], torch.ones(4))
    assert b0["g"].shape == (5, 2) and not torch.equal(b0["g"], b1["g"])
    assert torch.equal(b0["g"], again["g"])


def test_unsupported_and_missing_sources_fail_in_init(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaffeError, match="layer 'm' \\(MemoryData\\): not supported"):
        NetFeeder(_net('layer { name: "m" type: "MemoryData" top: "a" top: "b" memory_data_param '
                       '{ batch_size: 1 channels: 1 height: 1 width: 1 } }'), TRAIN)
    with pytest.raises(CaffeError, match="layer 'h' \\(HDF5Data\\): not supported"):
        NetFeeder(_net('layer { name: "h" type: "HDF5Data" top: "a" hdf5_data_param { source: "x" } }'), TRAIN)
    with pytest.raises(CaffeError, match="layer 'd' \\(Data\\): backend LEVELDB.*convert 'old_db'"):
        NetFeeder(_net(_data_layer("old_db", 2, backend="LEVELDB")), TRAIN)
    with pytest.raises(CaffeError, match="layer 'd' \\(Data\\): LMDB 'no/such_lmdb' does not exist"):
        NetFeeder(_net(_data_layer("no/such_lmdb", 2)), TRAIN)
    assert data_layer_shapes(parse_net(_data_layer("no/such_lmdb", 2)).layer[0], TRAIN) == {}


def test_corrupt_record_in_a_worker_is_a_one_line_error(tmp_path):
    with LMDBWriter(tmp_path / "db") as w:
        for i in range(8):
            w.put(caffe_key(i), array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString()
                  if i != 5 else b"\x0a\x05broken")
    with NetFeeder(_net(_data_layer(tmp_path / "db", 4)), TRAIN, workers=1) as feeder:
        feeder.next()
        with pytest.raises(CaffeError, match="record '00000005'"):
            feeder.next()


def test_image_data_layer_reads_resizes_and_shuffles_per_pass(monkeypatch):
    case = require_golden() / "transformer"
    monkeypatch.chdir(case)
    layer = ('layer {{ name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ '
             'source: "list.txt" batch_size: 4 new_height: 64 new_width: 64 {extra} }} }}')
    net = _net(layer.format(extra=""), TEST)
    assert data_layer_shapes(net.layer[0], TEST) == {"data": (4, 3, 64, 64), "label": (4,)}
    images = np.load(case / "decoded" / "images.npy").astype(np.float32)  # convert_imageset's resize
    with NetFeeder(net, TEST) as feeder:
        for b in range(3):
            idx = np.arange(4 * b, 4 * b + 4) % 6
            batch = feeder.next()
            np.testing.assert_array_equal(batch["data"].numpy(), images[idx])
            np.testing.assert_array_equal(batch["label"].numpy(), idx)
    with NetFeeder(_net(layer.format(extra="shuffle: true rand_skip: 3"), TRAIN), TRAIN, seed=9) as feeder:
        labels = np.concatenate([feeder.next()["label"].numpy() for _ in range(6)]).astype(int)  # 24 = 4 passes
    skip = feeder.sources[0][1].skip
    passes = np.concatenate([np.full(skip, -1), labels])[:24].reshape(4, 6)
    for p in passes[1:]:
        assert sorted(p) == list(range(6))  # every later pass is a permutation of all lines
    assert len({tuple(p) for p in passes[1:]}) > 1  # reshuffled between passes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batches_arrive_on_the_device():
    db = require_golden() / "_data" / "mnist_test_lmdb"
    with NetFeeder(_net(_data_layer(db, 8)), TRAIN, workers=1, device="cuda") as feeder:
        batch = feeder.next()
    assert batch["data"].is_cuda and batch["label"].is_cuda


# -- worker processes (runner.prefetch) --------------------------------------------------------------

def test_kept_batches_are_the_callers_own_and_equal_to_in_process_ones():
    """The ring has max(4, 2 * workers) slots; 12 batches kept by the caller stay intact after later ones
    arrive, and equal the in-process stream bit for bit."""
    db = require_golden() / "_data" / "mnist_test_lmdb"
    streams = {}
    for workers in (0, 1, 2):
        with NetFeeder(_random_net(db), TRAIN, seed=4, workers=workers) as feeder:
            streams[workers] = [feeder.next() for _ in range(12)]
    for workers in (1, 2):
        for x, y in zip(streams[0], streams[workers], strict=True):
            assert torch.equal(x["data"], y["data"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(streams[2][0]["data"], streams[2][8]["data"])


def test_a_killed_worker_is_a_one_line_error_not_a_hang():
    import os
    import signal

    db = require_golden() / "_data" / "mnist_test_lmdb"
    with NetFeeder(_random_net(db), TRAIN, seed=1, workers=1) as feeder:
        feeder.next()
        worker = feeder._iter.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(CaffeError, match=r"data worker 0 \(pid \d+\) died \(SIGKILL\) while reading batch"):
            for _ in range(10):  # the slots filled before the kill come first
                feeder.next()
        assert feeder._iter is None  # stopped; a retry starts new workers at the failed batch


def test_images_of_varying_size_cross_whole(tmp_path, monkeypatch):
    """ImageData at batch 1 without a resize: every batch has its image's own shape, so it cannot go
    through a slot of the first image's shape; it is sent whole, in order."""
    import cv2

    monkeypatch.chdir(tmp_path)
    sizes = [(5, 7), (9, 4), (5, 7), (3, 3)]
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(f"{i}.png", np.full((h, w), 10 * i, np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(len(sizes))))
    net = _net('layer { name: "img" type: "ImageData" top: "data" top: "label" '
               'image_data_param { source: "list.txt" batch_size: 1 is_color: false } }', TEST)
    with NetFeeder(net, TEST, workers=2) as feeder:
        batches = [feeder.next() for _ in range(6)]
    for k, batch in enumerate(batches):
        i = k % len(sizes)
        assert batch["data"].shape == (1, 1, *sizes[i]) and int(batch["label"][0]) == i
        assert torch.all(batch["data"] == 10 * i)


# -- buffers used again (runner.prefetch.BufferPool) -------------------------------------------------

def test_buffer_pool_hands_out_a_tensor_again_only_when_nobody_holds_it():
    from runner.prefetch import BufferPool

    pool = BufferPool(keep=2)
    first = pool.take((4, 3))
    ptr = first.data_ptr()
    weight = torch.ones(2, 3, requires_grad=True)
    holds = {
        "a name": lambda t: t,
        "a view": lambda t: t[1:],
        "a numpy array": lambda t: t.numpy(),
        "an autograd node": lambda t: (t @ weight.t()).sum(),  # saves the tensor for the weight's gradient
    }
    for what, hold in holds.items():
        held = hold(first)
        del first
        other = pool.take((4, 3))
        assert other.data_ptr() != ptr, f"handed out again while {what} holds it"
        del held, other
        first = pool.take((4, 3))
        assert first.data_ptr() == ptr, f"not handed out again once {what} let go"
    assert pool.take((3, 4)).data_ptr() != ptr  # another shape, another tensor
    kept = [pool.take((4, 3)) for _ in range(4)]  # one in use above, keep=2: the rest are never kept
    assert len(pool.kept[((4, 3), torch.float32)]) == 2 and len({t.data_ptr() for t in kept}) == 4


@pytest.mark.parametrize("workers", [0, 1])
def test_the_feeder_writes_into_batches_the_caller_let_go(workers, monkeypatch):
    """Steady state: a batch dropped by the caller is written again (no new 74 MB tensor per KITTI batch);
    one the caller keeps is never written into."""
    db = require_golden() / "_data" / "mnist_test_lmdb"
    made = []
    empty = torch.empty

    def counting_empty(*args, **kwargs):
        made.append(args[0] if len(args) == 1 else args)
        return empty(*args, **kwargs)

    with NetFeeder(_random_net(db), TRAIN, seed=3, workers=workers) as feeder:
        kept = feeder.next()["data"]
        copy = kept.clone()
        monkeypatch.setattr(torch, "empty", counting_empty)
        ptrs = [feeder.next()["data"].data_ptr() for _ in range(10)]
        monkeypatch.undo()
        torch.testing.assert_close(kept, copy, rtol=0, atol=0)
        assert kept.data_ptr() not in ptrs
    batches = [s for s in made if tuple(s) == (16, 1, 20, 20)]
    assert len(batches) <= 3, f"{len(batches)} new batch tensors for 10 batches"
