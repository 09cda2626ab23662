"""The data stages of an experiment (``data { … }`` in experiment.prototxt), one function per generator.

Each stage writes into ``data/<experiment>/<scale>/<folder>/`` and leaves a marker holding the stage's
parameters as text; a stage whose marker matches is not made again, one whose parameters changed is
rebuilt (LMDBs overwritten).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import text_format

from converter import experiment_pb2
from converter.errors import CaffeError
from data_prep.imageset import read_list_text
from runner.probe_data import Sample, by_class, choose, read_list, sun_partition

Echo = Callable[[str], None]


def make(stage: experiment_pb2.DataStage, root: Path, echo: Echo) -> None:
    """Make one stage under ``root`` (the experiment's data folder for this scale) unless it is made."""
    out = root / stage.folder if stage.folder else root
    out.mkdir(parents=True, exist_ok=True)
    marker = out / f"READY_{stage.name}.prototxt"
    which = _generator(stage)
    # the parameters and the folder the data came from: another KITTI_DIR, SUN_DIR, … makes the stage again
    wanted = text_format.MessageToString(stage) + f"# source: {_source(stage, which)}\n"
    if marker.exists() and marker.read_text() == wanted:
        echo(f"data {stage.name}: {out} is ready")
        return
    start = time.perf_counter()
    GENERATORS[which](getattr(stage, which), out, echo)
    marker.write_text(wanted)
    echo(f"data {stage.name}: made in {time.perf_counter() - start:.0f} s ({out})")


def _source(stage: experiment_pb2.DataStage, which: str) -> str:
    """``VAR=/resolved/folder`` of the environment variable generator ``which`` reads (``VAR=`` when unset)."""
    var = getattr(getattr(stage, which), "env", "") or ("MNIST_DIR" if which.startswith("mnist") else "")
    if not var:
        return ""
    value = os.environ.get(var)
    return f"{var}={Path(value).resolve() if value else ''}"


def _generator(stage: experiment_pb2.DataStage) -> str:
    set_ = [name for name in GENERATORS if stage.HasField(name)]
    if len(set_) != 1:
        raise CaffeError(f"data stage '{stage.name}': give exactly one generator ({', '.join(GENERATORS)}), "
                         f"got {', '.join(set_) or 'none'}")
    return set_[0]


@functools.cache
def _mnist_digits(folder: str | None):
    """MNIST, read once per process and source however many stages use it (the pairs and the digit sets)."""
    from data_prep.mnist import load_mnist

    return load_mnist(folder)


def _mnist(echo: Echo):
    mnist = _mnist_digits(os.environ.get("MNIST_DIR"))
    echo(f"data: MNIST from {mnist.origin}")
    return mnist


def mnist_pairs(p: experiment_pb2.MnistPairsParameter, out: Path, echo: Echo) -> None:
    """Pair LMDBs: training pairs from the training digits, validation pairs from the test digits."""
    from data_prep.mnist import write_pair_lmdbs

    mnist = _mnist(echo)
    for split, images, count, seed in (("train", mnist.train_images, p.train_pairs, p.train_seed),
                                       ("val", mnist.test_images, p.val_pairs, p.val_seed)):
        write_pair_lmdbs(images, count, seed, out / f"pairs_{split}_lmdb", out / f"pairs_{split}_labels_lmdb",
                         out / f"pairs_{split}.tsv", mode="overwrite")
    echo(f"data: {p.train_pairs:,} + {p.val_pairs:,} pairs")


def mnist_digits(p: experiment_pb2.MnistDigitsParameter, out: Path, echo: Echo) -> None:
    """A seeded class-balanced draw of each label count from the training digits, and the whole test set."""
    from data_prep.mnist import labelled_subset, write_digit_lmdb

    mnist = _mnist(echo)
    for count in p.label_count:
        for seed in p.seed:
            idx = labelled_subset(mnist.train_labels, count, seed)
            write_digit_lmdb(mnist.train_images[idx], mnist.train_labels[idx],
                             out / f"digits_train_{count}_seed{seed}_lmdb", mode="overwrite")
    write_digit_lmdb(mnist.test_images, mnist.test_labels, out / "digits_test_lmdb", mode="overwrite")


def kitti_pairs(p: experiment_pb2.KittiPairsParameter, out: Path, echo: Echo) -> None:
    """``egomotion data kitti-pairs`` with the stage's values (data_prep/kitti.py has the rules)."""
    from data_prep import kitti

    kitti_dir = os.environ.get(p.env)
    if not kitti_dir:
        raise CaffeError(f"{p.env} is not set: {kitti.WHERE_KITTI}")
    totals = {k: v for k, v in (("train", p.train_pairs), ("val", p.val_pairs)) if p.HasField(f"{k}_pairs")}
    opts = kitti.PairOptions(
        task=p.task, labels=p.labels, translation_frame=p.translation_frame, thesis_overflow=p.thesis_overflow,
        sampling=p.sampling, max_offset=p.max_offset, sfa_max_offset=p.sfa_max_offset, store=p.store, crop=p.crop,
        cameras=tuple(c.strip() for c in p.camera.split(",")), mode=p.mode, pairs_per_sequence=p.pairs_per_sequence,
        total_pairs=totals, seed=p.seed)
    kitti.make_pairs(kitti_dir, out, opts, p.train, p.val, overwrite=True, mean=p.mean, echo=echo)


# ----------------------------------------------------------------------------------------------------
# Image sets (transfer)
# ----------------------------------------------------------------------------------------------------
def image_pools(p: experiment_pb2.ImageSetParameter) -> list[tuple[list[Sample], list[Sample] | None]]:
    """(training pool, test pool or None) per partition, from whatever the folder holds (see the schema)."""
    folder = os.environ.get(p.env) if p.env else None
    if not folder or not Path(folder).is_dir():
        raise CaffeError(f"{p.env} is not set or not a folder (got '{folder or ''}'): give the image folder, "
                         f"e.g. {p.env}=/path make eval EXP=transfer")
    folder = Path(folder).resolve()  # the lists hold absolute paths: they are read from their own folder
    partitions = list(p.partition) or [1]
    if p.train_list:
        train = image_list(folder / p.train_list, folder / p.train_root)
        test = image_list(folder / p.test_list, folder / p.test_root) if p.test_list else None
        return [(train, train if p.test_is_train else test)] * len(partitions)
    if any((folder / sub / f"Training_{k:02d}.txt").exists() for sub in ("", "Partitions") for k in partitions):
        return [sun_partition(folder, k)[:2] for k in partitions]
    test_folder = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    if (folder / "train").is_dir():
        classes = class_names(folder / "train")
        train = folder_samples(folder / "train", classes)
        test = folder_samples(test_folder, classes) if test_folder else None
        return [(train, test)] * len(partitions)
    classes = class_names(folder)
    if classes:
        return [(folder_samples(folder, classes), None)] * len(partitions)
    raise CaffeError(f"{folder}: no SUN-397 partition files (Training_01.txt), no train/ folder of classes, no "
                     "class sub-folders, and the experiment names no train_list")


def image_list(path: Path, root: Path) -> list[Sample]:
    """A Caffe list (``path label``), or a table with a header naming its ``file`` column and its label column
    (``label``, ``index`` or ``class_index``), tab-separated like ImageNet's and SUN's sample tables."""
    lines = read_list_text(path, "an image list or table").splitlines() if path.is_file() else []
    header = lines[0].split("\t") if lines else []
    label = next((c for c in ("label", "class_index", "index") if c in header), None)
    if "file" not in header or label is None:
        return read_list(path, root)
    at, lab = header.index("file"), header.index(label)
    samples = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) <= max(at, lab) or not fields[lab].strip().lstrip("-").isdigit():
            raise CaffeError(f"{path}:{number}: expected the columns of the header ({', '.join(header)})")
        samples.append(Sample(str(root / fields[at]), int(fields[lab])))
    return samples


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def class_names(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_samples(folder: Path, classes: list[str]) -> list[Sample]:
    """Every image in ``folder/<class>/``, labelled by the class's rank among ``classes``."""
    samples = []
    for label, name in enumerate(classes):
        images = sorted(f for f in (folder / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        samples += [Sample(str(f), label) for f in images]
    return samples


def image_set(p: experiment_pb2.ImageSetParameter, out: Path, echo: Echo) -> None:
    """Lists ``train_<N>_p<k>.txt`` / ``test_<N>_p<k>.txt`` (absolute paths) per partition and N, and with
    ``lmdb`` the LMDBs of them (convert_imageset, shuffled)."""
    from data_prep.imageset import convert_imageset

    test_per_class = None if p.test_per_class in ("", "same") else int(p.test_per_class)
    for k, (train_pool, test_pool) in zip(list(p.partition) or [1], image_pools(p), strict=True):
        for n in p.per_class:
            train, rest = draw(train_pool, n, p.seed, k, keep_one=test_pool is None)
            test = test_pool if test_pool is not None else rest
            keep = n if p.test_per_class == "same" else test_per_class
            if keep:
                test = [s for group in by_class(test).values() for s in group[:keep]]
            for split, samples in (("train", train), ("test", test)):
                listing = out / f"{split}_{n}_p{k}.txt"
                listing.write_text("".join(f"{s.ref} {s.label}\n" for s in samples))
                if p.lmdb:
                    convert_imageset("", listing, out / f"{split}_{n}_p{k}_lmdb", shuffle=split == "train",
                                     seed=p.seed, resize_height=p.resize_height, resize_width=p.resize_width,
                                     mode="overwrite")
            echo(f"data: partition {k}, {n}/class: {len(train)} training and {len(test)} test images")


def draw(pool: list[Sample], n: int, seed: int, partition: int, keep_one: bool) -> tuple[list[Sample], list[Sample]]:
    """``n`` images of every class (seeded), and the rest. A class with fewer gives all it has (ILSVRC's
    "1000 per class" column: its classes hold 732 to 1,300); ``n`` above every class's size is refused."""
    groups = by_class(pool)
    largest = max(len(g) for g in groups.values())
    if n + keep_one > largest:
        raise CaffeError(f"{n} images per class asked, but the largest class holds {largest}"
                         + (" (one is kept for testing)" if keep_one else "") + ": lower per_class in the scale")
    train, rest = [], []
    for group in groups.values():
        if len(group) <= n + keep_one:
            train += group[:len(group) - keep_one]
            rest += group[len(group) - keep_one:]
        else:
            chosen, left = choose(group, n, seed, partition)
            train += chosen
            rest += left
    return train, rest


GENERATORS = {"mnist_pairs": mnist_pairs, "mnist_digits": mnist_digits, "kitti_pairs": kitti_pairs,
              "image_set": image_set}
