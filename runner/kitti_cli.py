"""``egomotion data kitti-pairs``: the KITTI experiment's LMDBs (``data_prep.kitti`` has the rules), and
``python -m runner.kitti_cli plot-heads train.csv -o heads.png``: each head's loss and accuracy."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from converter import experiment_pb2
from converter.errors import CaffeError
from data_prep import kitti
from runner.curves import read_curves
from runner.flags import int32
from runner.plot import save_figure


def add_kitti_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``kitti-pairs`` to the ``egomotion data`` subcommands."""
    p = sub.add_parser("kitti-pairs", help="KITTI odometry frame pairs -> image LMDB, motion-label LMDB, manifest",
                       description="KITTI odometry frame pairs as the thesis's (or the paper's) LMDBs: "
                       "pairs_{train,val}_lmdb, pairs_{train,val}_labels_lmdb (same keys), pairs_{train,val}.tsv, "
                       "summary.json; the class histogram per axis is printed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kitti-dir", default=None, help="the dataset/ folder (default: $KITTI_DIR)")
    p.add_argument("--out", required=True, help="output folder")
    d = experiment_pb2.KittiPairsParameter()  # every default is the schema's (converter/experiment.proto)
    p.add_argument("--task", default=d.task, choices=["egomotion", "sfa"])
    p.add_argument("--labels", default=d.labels, choices=["thesis", "agrawal2015"],
                   help="the thesis's fixed ranges (20 classes) or the paper's z-scored bins (22 classes)")
    p.add_argument("--translation-frame", default=d.translation_frame, choices=["camera", "world", "thesis"],
                   help="t2-t1 in world coordinates (world, alias thesis: what the thesis and the paper did), or "
                   "ΔX, ΔZ in the first camera's frame (camera: the motion as the camera sees it)")
    p.add_argument("--thesis-overflow", default=d.thesis_overflow, choices=["clamp", "drop"],
                   help="pairs above the thesis's range (its class 20): class 19, or left out")
    p.add_argument("--sampling", default=d.sampling, choices=["thesis", "paper"],
                   help="offsets uniform 1..7 (thesis) or round(U*7) = 0..7 (paper); SFA: 1..20 uniform (thesis) "
                   "or half close, half far (paper)")
    p.add_argument("--max-offset", type=int32, default=d.max_offset,
                   help="egomotion partner offset; the SFA 'close' limit")
    p.add_argument("--sfa-max-offset", type=int32, default=d.sfa_max_offset, help="SFA offsets with --sampling thesis")
    p.add_argument("--store", default=d.store, choices=["crop", "full"],
                   help="one random crop window per pair, the same in both frames (thesis), or whole frames (paper)")
    p.add_argument("--crop", type=int32, default=d.crop)
    p.add_argument("--camera", default=d.camera,
                   help="image_0..image_3, or several comma-separated (each pair takes one at random)")
    p.add_argument("--mode", default=d.mode, choices=["auto", "color", "gray"],
                   help="auto: grey for image_0/1, colour (BGR) for image_2/3")
    p.add_argument("--train", default=d.train,
                   help=f"training sequences, e.g. 00-08, 00,02 or 00:0-119 (paper: {kitti.PAPER_SPLIT[0]})")
    p.add_argument("--val", default=d.val, help=f"validation sequences, or none (paper: {kitti.PAPER_SPLIT[1]})")
    p.add_argument("--pairs-per-sequence", type=int32, default=d.pairs_per_sequence)
    p.add_argument("--train-pairs", type=int32, default=None, help="total training pairs, shared in proportion to "
                   "sequence length (instead of --pairs-per-sequence)")
    p.add_argument("--val-pairs", type=int32, default=None, help="total validation pairs, likewise")
    p.add_argument("--seed", type=int32, default=d.seed)
    p.add_argument("--mean", action=argparse.BooleanOptionalAction, default=d.mean,
                   help="also write mean_train.binaryproto (compute_image_mean)")
    p.add_argument("--overwrite", action="store_true", help="rebuild existing LMDBs")
    p.add_argument("--cache-mb", type=int32, default=2048, help="memory for decoded frames")
    p.set_defaults(handler=run_pairs)


def run_pairs(args: argparse.Namespace) -> int:
    kitti_dir = args.kitti_dir or os.environ.get("KITTI_DIR")
    if not kitti_dir:
        raise CaffeError(f"no KITTI folder given (--kitti-dir or KITTI_DIR). {kitti.WHERE_KITTI}")
    totals = {k: v for k, v in (("train", args.train_pairs), ("val", args.val_pairs)) if v is not None}
    opts = kitti.PairOptions(
        task=args.task, labels=args.labels,
        translation_frame="world" if args.translation_frame == "thesis" else args.translation_frame,
        thesis_overflow=args.thesis_overflow, sampling=args.sampling, max_offset=args.max_offset,
        sfa_max_offset=args.sfa_max_offset, store=args.store, crop=args.crop,
        cameras=tuple(c.strip() for c in args.camera.split(",")), mode=args.mode,
        pairs_per_sequence=args.pairs_per_sequence, total_pairs=totals, seed=args.seed)
    kitti.make_pairs(kitti_dir, args.out, opts, args.train, args.val, overwrite=args.overwrite, mean=args.mean,
                     cache_mb=args.cache_mb, echo=lambda text: print(text, flush=True))
    return 0


# ---------------------------------------------------------------------------------------------------
# Per-head curves (``egomotion plot`` draws the smoothed total loss, the lr and the test outputs)
# ---------------------------------------------------------------------------------------------------
def plot_heads(csv_path: str | Path, output: str | Path, title: str = "", classes: int = 20) -> None:
    """Each head's loss and accuracy, train and test, against the iteration, with the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(csv_path)
    losses = {k: v for k, v in sorted(curves.items()) if k.split()[-1].startswith("loss")}
    accuracies = {k: v for k, v in sorted(curves.items()) if k.split()[-1].startswith("acc")}
    panels = [(name, series) for name, series in (("loss", losses), ("accuracy", accuracies)) if series]
    if not panels:
        raise CaffeError(f"{csv_path}: no loss or accuracy rows")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, series) in zip(axes[:, 0], panels, strict=True):
        for i, (label, points) in enumerate(series.items()):
            head = label.rsplit("_", 1)[-1]  # loss_x -> x: one colour per head, train thin, test with dots
            colour = {"x": "tab:blue", "y": "tab:orange", "z": "tab:green"}.get(head, f"C{3 + i % 7}")
            train = label.startswith("train")
            ax.plot(*zip(*sorted(points), strict=True), "-" if train else "o-", color=colour, ms=4,
                    lw=0.8 if train else 2, alpha=0.6 if train else 1, label=label)
        if name == "accuracy":
            ax.axhline(1 / classes, color="grey", ls="--", lw=1, label=f"chance (1/{classes})")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2)
    axes[-1, 0].set_xlabel("iteration")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    try:
        save_figure(fig, output)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.kitti_cli")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("plot-heads", help="train.csv -> a PNG of each head's loss and accuracy (train and test)")
    p.add_argument("csv")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--classes", type=int32, default=20, help="classes per head (the chance line)")
    args = parser.parse_args(argv)
    try:
        plot_heads(args.csv, args.output, args.title, args.classes)
    except CaffeError as e:
        print(f"plot-heads: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
