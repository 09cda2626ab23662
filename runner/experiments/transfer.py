"""The thesis's transfer experiments (notes §1.4.4-5), chained from the CLI as a Caffe user would.

``sun``: SUN-397 layer probes. Each pre-trained snapshot's BCNN is exported through
``prototxt/kitti/bcnn_deploy.prototxt`` (conv1..conv5 copied by layer name) with the probe blobs as
outputs, then ``egomotion probe`` trains the probes on ONNX Runtime features of the official partitions
(1, 2, 3), 5 and 20 images per class, as the thesis prepared SUN: zero-padded to a square, resized to
227×227, ILSVRC'12 mean values, the first N test images per class. Writes ``<out>/sun397/probe.{md,csv,png}``.

``imagenet``: fine-tuning every layer of ``prototxt/transfer/imagenet_train_val.prototxt`` from each
snapshot (and from random initialisation) on N images per class (1, 5, 10, 20, 1000), with
``imagenet_finetune_solver.prototxt``. Per N: a seeded subset of ``train.txt``, LMDBs made by
``egomotion data convert-imageset`` (227×227, shuffled), one run folder per method with the filled
prototxts, ``egomotion train``, and the best test accuracy from its ``train.csv`` (the thesis kept the
best). Writes ``<out>/imagenet/results.{md,csv}`` beside the thesis's numbers.

    python -m runner.experiments.transfer sun --sun-dir SUN397 --pretrained KITTI-EGO=ego.caffemodel,KITTI-SFA=…
    python -m runner.experiments.transfer imagenet --imagenet-dir ILSVRC --pretrained ... [--gpu 0]
    python -m runner.experiments.transfer all --sun-dir ... --imagenet-dir ... --pretrained ...

``--sun-dir`` holds ``Training_NN.txt``/``Testing_NN.txt`` (or ``Partitions/``) and the images (``a/abbey/…``);
``--imagenet-dir`` holds Caffe's ``train.txt``/``val.txt`` lists (``path label``) and ``train/``, ``val/``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import read_net, read_solver, write_message
from runner.cli import main as cli
from runner.probe_data import choose, read_list
from runner.report import THESIS_IMAGENET

ROOT = Path(__file__).resolve().parents[2]
BCNN = ROOT / "prototxt" / "kitti" / "bcnn_deploy.prototxt"
TRANSFER = ROOT / "prototxt" / "transfer"
PROBE_BLOBS = "pool1,norm1,pool2,norm2,conv3,conv4,conv5,pool5"
MEAN = ["--mean-value", "104", "--mean-value", "117", "--mean-value", "123"]


def pretrained(text: str) -> dict[str, str]:
    """``NAME=file.caffemodel,NAME=…`` (a bare file is named after its stem)."""
    out = {}
    for item in (t for t in (text or "").split(",") if t):
        name, sep, path = item.rpartition("=")
        name = name if sep else Path(path).stem
        if not Path(path).is_file():
            raise CaffeError(f"--pretrained {name}: no such file {path}")
        out[name] = path
    return out


def run_cli(argv: list[str]) -> None:
    rc = cli(argv)
    if rc:
        raise CaffeError(f"'egomotion {' '.join(argv)}' failed (exit {rc})")


def sun(args: argparse.Namespace) -> Path:
    if not args.sun_dir or not Path(args.sun_dir).is_dir():
        raise CaffeError("SUN_DIR is not set or not a folder: unpack SUN397.tar.gz and Partitions.zip from "
                         "https://vision.princeton.edu/projects/2010/SUN/ and pass the folder (--sun-dir / SUN_DIR)")
    nets = pretrained(args.pretrained)
    if not nets:
        raise CaffeError("no pre-trained snapshots: --pretrained NAME=file.caffemodel,... (PRETRAINED=...)")
    out = Path(args.out) / "sun397"
    out.mkdir(parents=True, exist_ok=True)
    probe_nets = []
    for name, weights in nets.items():
        onnx_path = out / f"{name}.onnx"
        run_cli(["export", "--model", str(args.model or BCNN), "--weights", weights, "--outputs", PROBE_BLOBS,
                 "-o", str(onnx_path)])
        probe_nets += ["--net", f"{name}={onnx_path}"]
    flags = ["--sun-dir", args.sun_dir, "--sun-partitions", args.partitions, "--per-class", args.sun_per_class,
             "--probe", args.probe, "--pad-square", "--resize", "227,227", *MEAN, "--test-per-class", "same",
             "--device", args.device, "--thesis-table", "sun", "-o", str(out)]
    if args.sun_images:
        flags += ["--sun-images", args.sun_images]
    for flag in ("iters", "hidden"):
        if getattr(args, flag) is not None:
            flags += [f"--{flag}", str(getattr(args, flag))]
    run_cli(["probe", *probe_nets, *flags])
    return out / "probe.md"


def imagenet(args: argparse.Namespace) -> Path:
    folder = Path(args.imagenet_dir) if args.imagenet_dir else None
    if folder is None or not (folder / "train.txt").is_file() or not (folder / "val.txt").is_file():
        raise CaffeError("IMAGENET_DIR is not set or lacks train.txt/val.txt: give the ILSVRC'12 folder with Caffe's "
                         "lists (data/ilsvrc12/get_ilsvrc_aux.sh) and the train/ and val/ images (--imagenet-dir)")
    methods = dict(pretrained(args.pretrained))
    methods["ALEXNET (random init)"] = ""
    out = Path(args.out) / "imagenet"
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    convert = ["data", "convert-imageset", "--resize_height", "227", "--resize_width", "227"]
    val_db = data / "val_lmdb"
    if not val_db.exists():
        run_cli([*convert, f"{folder / 'val'}/", str(folder / "val.txt"), str(val_db)])
    val_count = sum(1 for line in (folder / "val.txt").read_text().splitlines() if line.strip())
    train_pool = read_list(folder / "train.txt", folder / "train")
    results: dict[str, dict[int, float]] = {m: {} for m in methods}
    for n in (int(v) for v in args.imagenet_per_class.split(",")):
        db = data / f"train_{n}_lmdb"
        if not db.exists():
            subset = train_pool if n >= 1000 else choose(train_pool, n, args.seed, 0)[0]
            listing = data / f"train_{n}.txt"
            root = f"{folder / 'train'}/"
            listing.write_text("".join(f"{s.ref[len(root):]} {s.label}\n" for s in subset))
            run_cli([*convert, "--shuffle", "--seed", str(args.seed), root, str(listing), str(db)])
        for method, weights in methods.items():
            run = out / method.split(" ")[0].lower() / f"{n}_per_class"
            run.mkdir(parents=True, exist_ok=True)
            solver_path = fill_run(run, db, val_db, val_count, args.iterations)
            argv = ["train", "--solver", str(solver_path)] + (["--weights", weights] if weights else [])
            run_cli(argv + (["--gpu", args.gpu] if args.gpu else []))
            results[method][n] = 100 * best_accuracy(run / "train.csv")
    return write_imagenet_table(out, results)


def fill_run(run: Path, train_db: Path, val_db: Path, val_count: int, iterations: int | None) -> Path:
    """The transfer prototxts with this run's LMDBs, test_iter covering the validation set, snapshots here."""
    net = read_net(TRANSFER / "imagenet_train_val.prototxt")
    for lp in net.layer:
        if lp.type == "Data":
            is_test = any(r.phase == caffe_pb2.TEST for r in lp.include)
            lp.data_param.source = str(val_db if is_test else train_db)
    net_path = run / "train_val.prototxt"
    write_message(net_path, net)
    solver = read_solver(TRANSFER / "imagenet_finetune_solver.prototxt")
    solver.net = str(net_path)
    solver.snapshot_prefix = str(run / "snap")
    solver.test_iter[:] = [max(1, -(-val_count // 125))]
    if iterations:
        solver.max_iter = iterations
    solver_path = run / "solver.prototxt"
    solver_path.write_text(text_format.MessageToString(solver))
    return solver_path


def best_accuracy(path: Path) -> float:
    """The best test ``accuracy`` in a train.csv (``iter,seconds,phase,name,value``)."""
    with path.open() as f:
        values = [float(r["value"]) for r in csv.DictReader(f)
                  if r["phase"].startswith("test") and r["name"] == "accuracy"]
    if not values:
        raise CaffeError(f"{path}: no test accuracy recorded")
    return max(values)


def write_imagenet_table(out: Path, results: dict[str, dict[int, float]]) -> Path:
    sizes = sorted({n for r in results.values() for n in r})
    lines = ["### ILSVRC'12 top-1 (%) after fine-tuning all layers (best test accuracy)", "",
             "| method | " + " | ".join(f"{n}/class" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{r[n]:.2f}" if n in r else "–" for n in sizes) + " |"
              for m, r in results.items()]
    lines += ["", "### The thesis's numbers", "",
              "| method (thesis) | " + " | ".join(f"{n}/class" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{r[n]:.2f}" if n in r else "–" for n in sizes) + " |"
              for m, r in THESIS_IMAGENET.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "method", "per_class", "top1"])
        for source, table in (("ours", results), ("thesis", THESIS_IMAGENET)):
            for m, r in table.items():
                for n, v in r.items():
                    w.writerow([source, m, n, f"{v:.4f}"])
    return out / "results.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runner.experiments.transfer", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["sun", "imagenet", "all"])
    p.add_argument("--pretrained", default="", help="NAME=snapshot.caffemodel,... (KITTI-EGO, KITTI-SFA, ALEX-20, …)")
    p.add_argument("--sun-dir", default=None)
    p.add_argument("--sun-images", default=None)
    p.add_argument("--partitions", default="1,2,3")
    p.add_argument("--sun-per-class", default="5,20")
    p.add_argument("--probe", default="thesis", choices=["thesis", "linear"])
    p.add_argument("--model", default=None, help="the deploy tower to export (default: prototxt/kitti/bcnn_deploy)")
    p.add_argument("--iters", type=int, default=None, help="probe iterations (default: the probe definition's)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--imagenet-dir", default=None)
    p.add_argument("--imagenet-per-class", default="1,5,10,20,1000")
    p.add_argument("--iterations", type=int, default=None, help="fine-tuning max_iter (default: the solver's 40,000)")
    p.add_argument("--gpu", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/transfer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = []
        if args.what in ("sun", "all"):
            written.append(sun(args))
        if args.what in ("imagenet", "all"):
            written.append(imagenet(args))
    except CaffeError as e:
        print(f"transfer {args.what}: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
