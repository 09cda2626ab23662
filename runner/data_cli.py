"""``egomotion data …``: Caffe's data tools, flags spelled as theirs.

* ``convert-imageset [--gray] [--shuffle] [--resize_height H] [--resize_width W] [--encoded]
  [--encode_type png|jpg] [--check_size] [--append|--overwrite] ROOT/ LISTFILE DB`` (tools/convert_imageset)
* ``compute-image-mean DB [MEAN.binaryproto]`` (tools/compute_image_mean)
* ``inspect DB``: record count, formats and shapes, label histogram, first keys.

Boolean flags also take gflags' ``--flag=true|false`` spelling (``--shuffle=false`` as in Caffe's docs).
"""

from __future__ import annotations

import argparse
from collections import Counter

from converter.errors import CaffeError, format_shape, prefixed
from data_prep.datum import datum_to_array, encoding_of, parse_datum
from data_prep.imageset import compute_image_mean, convert_imageset
from data_prep.lmdb_io import LMDBReader, incomplete, looks_like_leveldb
from runner.flags import int32

_BOOL_FLAGS = {
    "gray": "treat images as grayscale ones",
    "shuffle": "randomly shuffle the order of images and their labels",
    "check_size": "check that all the images have the same size",
    "encoded": "store the encoded image (PNG/JPEG bytes) in the Datum",
}


def _bool_flag(p: argparse.ArgumentParser, name: str, help_text: str) -> None:
    """``--name`` plus gflags' ``--name=true/false/1/0`` spellings (exact option strings win in argparse)."""
    p.add_argument(f"--{name}", dest=name, action="store_true", default=False, help=help_text)
    for value, action in (("true", "store_true"), ("1", "store_true"), ("false", "store_false"),
                          ("0", "store_false")):
        p.add_argument(f"--{name}={value}", dest=name, action=action, help=argparse.SUPPRESS)


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="database backend (only lmdb is supported; leveldb is refused)")


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` verb and its subcommands to the top-level parser's subparsers."""
    data = subparsers.add_parser("data", help="make and look at LMDBs of Datums (convert-imageset, "
                                 "compute-image-mean, inspect)")
    sub = data.add_subparsers(dest="data_verb", required=True)

    p = sub.add_parser("convert-imageset", help="images listed as '<path> <label>' lines -> LMDB of Datums")
    for name, help_text in _BOOL_FLAGS.items():
        _bool_flag(p, name, help_text)
    p.add_argument("--resize_height", type=int32, default=0, help="height images are resized to")
    p.add_argument("--resize_width", type=int32, default=0, help="width images are resized to")
    p.add_argument("--encode_type", default="", help="encode as this type (png, jpg, ...); implies --encoded")
    _backend(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true",
                      help="add to an existing DB, skipping keys already in it (resumes an interrupted run)")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing DB first")
    p.add_argument("--seed", type=int32, default=None, help="seed of --shuffle (default: random, as Caffe)")
    p.add_argument("--threads", type=int32, default=None, help="image decoding threads (default: up to 8)")
    p.add_argument("root", metavar="ROOTFOLDER/", help="prefix of every listed path (concatenated as text)")
    p.add_argument("listfile", metavar="LISTFILE")
    p.add_argument("db", metavar="DB_NAME")

    p = sub.add_parser("compute-image-mean", help="mean Datum of an LMDB -> .binaryproto")
    _backend(p)
    p.add_argument("db", metavar="DB")
    p.add_argument("mean", metavar="MEAN.binaryproto", nargs="?", default=None)

    p = sub.add_parser("inspect", help="count, shapes, label histogram and first keys of an LMDB")
    p.add_argument("db", metavar="DB")
    p.add_argument("--keys", type=int32, default=5, help="how many first keys to print")
    p.add_argument("--limit", type=int32, default=0, help="scan at most this many records (0: all)")
    p.add_argument("--decode", type=int32, default=20, help="decode at most this many encoded records for shapes")

    from runner.mnist_cli import add_mnist_parsers

    add_mnist_parsers(sub)
    return data


def _check_backend(args: argparse.Namespace) -> None:
    if getattr(args, "backend", "lmdb") != "lmdb":
        raise CaffeError("--backend leveldb is not supported; use --backend lmdb (and backend: LMDB in the Data layer)")


def _inspect(args: argparse.Namespace) -> None:
    for flag in ("keys", "limit", "decode"):
        if getattr(args, flag) < 0:
            raise CaffeError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if looks_like_leveldb(args.db):
        raise CaffeError(f"'{args.db}' is a LevelDB; only LMDB is supported")
    with LMDBReader(args.db) as reader, prefixed(f"LMDB '{args.db}'"):
        total = len(reader)
        print(f"{args.db}: {total} records")
        writer = incomplete(args.db)
        if writer:
            print(f"INCOMPLETE: the writer ({writer}) stopped before it finished; these {total} records are "
                  "what it committed (rerun it with --append to finish)")
        formats: Counter = Counter()
        shapes: Counter = Counter()
        labels: Counter = Counter()
        small: list[Counter] = []
        keys: list[bytes] = []
        decoded = 0
        for n, (key, value) in enumerate(reader.items()):
            if args.limit and n >= args.limit:
                break
            if n < args.keys:
                keys.append(key)
            datum = parse_datum(value, key)
            labels[datum.label] += 1
            if datum.encoded:
                formats[f"encoded {encoding_of(datum.data)}"] += 1
                if decoded < args.decode:
                    shapes[format_shape(datum_to_array(datum, key=key).shape)] += 1
                    decoded += 1
                continue
            array = datum_to_array(datum, key=key)
            formats["raw uint8" if array.dtype.name == "uint8" else "float_data"] += 1
            shapes[format_shape(array.shape)] += 1
            if array.size <= 8 and array.shape[1:] == (1, 1):  # e.g. the thesis's (x, y, z) class records
                small += [Counter() for _ in range(array.size - len(small))]
                for c, v in enumerate(array.ravel().tolist()):
                    small[c][v] += 1
        scanned = sum(labels.values())
        if scanned < total:
            print(f"scanned the first {scanned} records (--limit)")
        print("formats: " + ", ".join(f"{k}: {v}" for k, v in formats.most_common()))
        note = f" (of the first {decoded} encoded records)" if decoded and formats.keys() != {"raw uint8"} else ""
        print("shapes (CxHxW)" + note + ": " + ", ".join(f"{k}: {v}" for k, v in shapes.most_common()))
        print(_histogram("labels", labels))
        for c, hist in enumerate(small):
            print(_histogram(f"data channel {c}", hist))
        print("first keys: " + ", ".join(k.decode(errors="replace") for k in keys))


def _histogram(title: str, hist: Counter, most: int = 30) -> str:
    items = sorted(hist.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:most])
    if len(items) > most:
        text += f", ... ({len(items)} distinct values, {items[0][0]}..{items[-1][0]})"
    return f"{title}: {text}"


def run_data(args: argparse.Namespace) -> int:
    """Run one ``egomotion data`` subcommand; user mistakes raise CaffeError (the CLI prints one line)."""
    _check_backend(args)
    if args.data_verb == "convert-imageset":
        for flag in ("resize_height", "resize_width"):
            if getattr(args, flag) < 0:
                raise CaffeError(f"--{flag} must be >= 0 (0: keep the image's size), got {getattr(args, flag)}")
        if args.threads is not None and args.threads < 1:
            raise CaffeError(f"--threads must be >= 1, got {args.threads}")
        counts = convert_imageset(
            args.root, args.listfile, args.db, gray=args.gray, shuffle=args.shuffle,
            resize_height=args.resize_height, resize_width=args.resize_width, check_size=args.check_size,
            encoded=args.encoded, encode_type=args.encode_type,
            mode="append" if args.append else "overwrite" if args.overwrite else "new",
            seed=args.seed, threads=args.threads)
        skipped = f" ({counts['skipped']} already in the DB)" if counts["skipped"] else ""
        print(f"Processed {counts['written']} files{skipped} -> {args.db}")
    elif args.data_verb == "compute-image-mean":
        mean, channels = compute_image_mean(args.db, args.mean)
        print(f"mean of {args.db}: shape {format_shape(mean.shape)}" +
              (f", written to {args.mean}" if args.mean else ""))
        for c, v in enumerate(channels.tolist()):
            print(f"mean_value channel [{c}]: {v:g}")
    elif args.data_verb == "inspect":
        _inspect(args)
    else:  # pragma: no cover - argparse enforces the choices
        raise CaffeError(f"unknown data subcommand {args.data_verb}")
    return 0
