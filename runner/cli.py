"""``egomotion``: the command line, verbs and flags spelled like Caffe's tools.

Every verb lives in its own module; this file only parses arguments and turns a :class:`CaffeError`
(any user mistake) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading

from converter.errors import CaffeError
from runner.flags import int32


class UsageError(Exception):
    """A command line argparse refuses; :func:`main` prints it as the one error line (no usage block)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line ``<prog>: error: <message>`` and exit code 2, like every
    other user mistake, instead of a usage block followed by the message."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(self.prog, message)


def _python_flag(p: argparse.ArgumentParser) -> None:
    """The flags of every verb that builds a net: Python layers (opt-in), the convolution engine, threads."""
    p.add_argument("--allow-python-layers", action="store_true",
                   help="run nets with type: \"Python\" layers (python_param names a module and class that are "
                   "imported and run: only for files you trust)")
    p.add_argument("--engine", choices=["default", "caffe", "cudnn"], default=None,
                   help="engine of the Convolution layers that leave engine at DEFAULT: caffe = im2col + GEMM "
                   "(Caffe's own), cudnn/default = torch's convolution (cuDNN on a GPU)")
    p.add_argument("--threads", type=int32, default=None,
                   help="intra-op CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use, "
                   "shared with the other egomotion jobs running on them); a fixed count fixes the last bits")


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected name=N,C,H,W with positive sizes, got '{text}'")
    return name, shape


def _named_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=file.npy, got '{text}'")
    return name, path


# verb -> (module, function): each verb's code is imported only when that verb runs
VERBS = {
    "check": ("runner.check", "check"),
    "upgrade": ("runner.check", "upgrade"),
    "forward": ("runner.forward", "forward"),
    "data": ("runner.data_cli", "run_data"),
    "export": ("runner.export", "export"),
    "probe": ("runner.probe", "probe"),
    "train": ("runner.train", "train"),
    "test": ("runner.test_cmd", "test"),
    "time": ("runner.time_cmd", "time_command"),
    "plot": ("runner.plot", "plot"),
    "draw": ("runner.draw", "draw"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="egomotion", description="Caffe prototxt nets, solvers and LMDBs trained and run with "
                    "Caffe's exact numerics on PyTorch; verbs and flags spelled like Caffe's tools.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("check", help="parse, upgrade, filter and build a net or solver; print its layers")
    p.add_argument("file", help="a net .prototxt/.caffemodel or a solver .prototxt")
    p.add_argument("--phase", default=None, help="TRAIN or TEST (default: the net's state, TEST)")
    p.add_argument("--level", type=int32, default=0)
    p.add_argument("--stage", action="append", default=[], help="a NetState stage (repeatable)")
    p.add_argument("--shape", type=_shape, action="append", default=[],
                   help="name=N,C,H,W for a data layer top whose source is absent (repeatable)")
    _python_flag(p)

    p = sub.add_parser("upgrade", help="write a V0/V1 net (or old solver) as upgraded V2 text")
    p.add_argument("input")
    p.add_argument("output")

    p = sub.add_parser("forward", help="one forward (and backward) pass, every blob dumped as .npy")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--input", type=_named_file, action="append", default=[], help="blob=file.npy")
    p.add_argument("--phase", default="TEST")
    p.add_argument("--stage", action="append", default=[])
    p.add_argument("--backward", action="store_true")
    p.add_argument("--top-diff", type=_named_file, action="append", default=[], help="blob=file.npy")
    p.add_argument("--dump", required=True, help="folder for <blob>.npy, diffs/, param_diffs/")
    p.add_argument("--gpu", default=None, help="CUDA device id (absent: CPU)")
    _python_flag(p)

    p = sub.add_parser("export", help="a net and its weights as ONNX (TEST phase, no data/loss layers)")
    p.add_argument("--model", required=True, help="deploy or train_val .prototxt")
    p.add_argument("--weights", default=None, help=".caffemodel (comma-separated for several)")
    p.add_argument("--outputs", default=None, help="comma-separated blobs to output (default: the net's outputs)")
    p.add_argument("--input-shape", action="append", default=[],
                   help="N,C,H,W for every input, or name=N,C,H,W (repeatable); the batch stays dynamic")
    p.add_argument("--opset", type=int32, default=17)
    p.add_argument("--stage", action="append", default=[], help="a NetState stage (repeatable)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--gpu", default=None, help="check parity against the module on this CUDA device (ORT's CUDA "
                   "provider when installed); the export itself is traced on the CPU")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    _python_flag(p)
    from runner.probe_cli import add_probe_parser

    add_probe_parser(sub)

    from runner.data_cli import add_data_parser

    data = add_data_parser(sub)
    from runner.kitti_cli import add_kitti_parsers

    add_kitti_parsers(next(a for a in data._actions if isinstance(a, argparse._SubParsersAction)))
    p = sub.add_parser("train", help="train a net as `caffe train` does (solver prototxt, snapshots, logs)")
    p.add_argument("--solver", required=True, help="the solver .prototxt")
    p.add_argument("--weights", default=None, help="fine-tune from .caffemodel(s), comma-separated")
    p.add_argument("--snapshot", default=None, help="resume from a .solverstate")
    p.add_argument("--gpu", default=None, help="CUDA device ids: 0, 0,1 or all (absent: CPU)")
    p.add_argument("--iterations", type=int32, default=None, help="override the solver's max_iter")
    p.add_argument("--sigint_effect", default="stop", help="on SIGINT: stop, snapshot or none")
    p.add_argument("--sighup_effect", default="snapshot", help="on SIGHUP: stop, snapshot or none")
    p.add_argument("--level", type=int32, default=None, help="the train net's NetState level")
    p.add_argument("--stage", default=None, help="the train net's NetState stages, comma-separated")
    p.add_argument("--log", default=None, help="log file (default: train.log beside the snapshots)")
    p.add_argument("--csv", default=None, help="CSV file (default: train.csv beside the snapshots)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with one GPU: capture the forward and backward pass as CUDA graphs once and replay them "
                   "(two launches a pass instead of one per operator); the solver's update stays eager")
    p.add_argument("--workers", type=int32, default=None,
                   help="data reading processes (0: in the main process; default 0 on the CPU, up to 4 with --gpu, "
                   "so the data is read ahead of the GPU); never changes a number")
    _python_flag(p)

    p = sub.add_parser("test", help="score a model on its TEST data as `caffe test` does")
    _python_flag(p)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True, help=".caffemodel(s), comma-separated")
    p.add_argument("--iterations", type=int32, default=50)
    p.add_argument("--gpu", default=None)
    p.add_argument("--phase", default="TEST")
    p.add_argument("--level", type=int32, default=0)
    p.add_argument("--stage", default=None, help="comma-separated NetState stages")

    p = sub.add_parser("time", help="average forward/backward time per layer as `caffe time` does")
    _python_flag(p)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--iterations", type=int32, default=50)
    p.add_argument("--gpu", default=None)
    p.add_argument("--phase", default="TRAIN")
    p.add_argument("--level", type=int32, default=0)
    p.add_argument("--stage", default=None, help="comma-separated NetState stages")

    p = sub.add_parser("plot", help="draw loss, learning rate and test outputs of a training log")
    p.add_argument("log", help="a Caffe-format training log (train.log, or Caffe's own)")
    p.add_argument("-o", "--output", required=True, help="the .png to write")
    p.add_argument("--title", default=None)
    p = sub.add_parser("draw", help="draw a net's layers and blobs (Caffe's draw_net.py)")
    p.add_argument("net", help="a net prototxt")
    p.add_argument("-o", "--output", required=True, help="net.png, net.svg, net.pdf, or net.dot (Graphviz text)")
    p.add_argument("--rankdir", default="LR", choices=["LR", "RL", "TB", "BT"], help="direction of the layers")
    p.add_argument("--phase", default=None, choices=["TRAIN", "TEST"], help="draw only this phase's layers")
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenCV writes its warnings (unreadable file, incomplete PNG) straight to stderr; the failures they
    # announce are reported as one CaffeError line instead. Read when OpenCV loads, so set before any import.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    # A file-size limit (ulimit -f) then fails a write with EFBIG, which is reported as one line and
    # cleaned up, instead of killing the process mid-write (SIGXFSZ's default).
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    from runner import threads as cpu_threads  # no torch: the check below must come before torch loads

    try:  # libgomp would warn about a bad value on stderr
        cpu_threads.omp_num_threads()
    except CaffeError as e:
        print(f"egomotion {args.verb}: error: {e}", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.entry = main  # what a multi-GPU training spawns in each process
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from converter.layers.base import allow_python_layers
    from converter.layers.vision import set_net_engine

    allow_python_layers(getattr(args, "allow_python_layers", False))
    set_net_engine(getattr(args, "engine", None))
    try:
        # the verbs that compute choose their threads and share the CPUs with the other egomotion jobs
        with cpu_threads.chosen(args.threads) if hasattr(args, "threads") else contextlib.nullcontext():
            if getattr(args, "handler", None):  # subcommands that carry their own handler (data kitti-pairs, …)
                return args.handler(args)
            module, function = VERBS[args.verb]
            return getattr(importlib.import_module(module), function)(args)
    except CaffeError as e:
        print(f"egomotion {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"egomotion {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        allow_python_layers(False)
        set_net_engine(None)


if __name__ == "__main__":
    sys.exit(main())
