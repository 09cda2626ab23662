"""The ``egomotion probe`` argument parser (kept free of heavy imports so ``egomotion --help`` stays fast)."""

from __future__ import annotations

import argparse

from runner.flags import int32


def add_probe_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("probe", help="per-layer softmax probes on ONNX Runtime features, N images per class")
    p.add_argument("--net", action="append", default=[], help="METHOD=model.onnx (repeatable; one table row each)")
    p.add_argument("--probe", choices=["thesis", "linear"], default="thesis",
                   help="thesis: linear on L1/L2, 1000-unit MLP on L3-L5; linear: dropout + softmax regression")
    p.add_argument("--layers", default=None, help="LABEL=blob,... (default: the probe's L1..L5)")
    p.add_argument("--mlp-layers", default=None, help="labels probed with the hidden layer (thesis: L3,L4,L5)")
    p.add_argument("--per-class", default="5,20", help="training images per class, e.g. 1,5,10,20")
    p.add_argument("--splits", type=int32, default=3, help="seeded partitions of a list (SUN: --sun-partitions)")
    p.add_argument("--seed", type=int32, default=0)
    p.add_argument("--train-list", default=None, help="'path label' lines")
    p.add_argument("--test-list", default=None, help="'path label' lines (default: the rest of each class)")
    p.add_argument("--root", default=None, help="folder the list paths are relative to (default: the list's)")
    p.add_argument("--train-lmdb", default=None)
    p.add_argument("--test-lmdb", default=None)
    p.add_argument("--sun-dir", default=None, help="folder with SUN397's Training_NN.txt/Testing_NN.txt")
    p.add_argument("--sun-images", default=None, help="SUN397 image folder (default: --sun-dir)")
    p.add_argument("--sun-partitions", default="1,2,3")
    p.add_argument("--test-per-class", default=None,
                   help="only the first K test images per class; 'same': K = the training N (the thesis' SUN LMDBs)")
    p.add_argument("--mean-file", default=None)
    p.add_argument("--mean-value", type=float, action="append", default=[])
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--crop-size", type=int32, default=None)
    p.add_argument("--resize", default=None, help="H,W before the transform (default: the mean's or the net's)")
    p.add_argument("--pad-square", action="store_true", help="zero-pad to a square first (the thesis' SUN prep)")
    p.add_argument("--solver", default=None,
                   help="a Caffe solver prototxt whose update rule, learning-rate policy and max_iter train every "
                   "probe (e.g. prototxt/transfer/sun397_probe_solver.prototxt); --iters and --lr still override")
    p.add_argument("--iters", type=int32, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int32, default=None, help="probe training batch")
    p.add_argument("--hidden", type=int32, default=None, help="hidden units of the MLP probes (thesis: 1000)")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--extract-batch", type=int32, default=64, help="images per ONNX Runtime call")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int32, default=None,
                   help="CPU threads of ONNX Runtime and the probes (default: OMP_NUM_THREADS, else the usable CPUs "
                   "shared with the other egomotion jobs running on them)")
    p.add_argument("--keep-features", action="store_true", help="keep <out>/features/ (memory-mapped .npy)")
    p.add_argument("--thesis-table", choices=["sun", "imagenet", "none"], default="sun")
    p.add_argument("-o", "--out", required=True, help="folder for probe.md, probe.csv, probe.png, results.json")
    return p
