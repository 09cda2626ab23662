"""``egomotion probe``: how good is each layer? Softmax probes on ONNX Runtime features, few labels per class.

Pipeline: exported ONNX model(s) (``egomotion export``, one per pre-training method) → features of the
chosen blobs from ONNX Runtime sessions (CUDA provider when it is usable, else the CPU; batched, the
next batch decoded while the current one runs) → for each N images per class and each partition, a probe
trained in PyTorch on the frozen features (GPU when present) → accuracy on the test images → a table
(mean ± sd over partitions) in markdown, CSV and PNG, written beside the thesis's numbers
(:mod:`runner.report`).

Two probe definitions (``--probe``):

``linear`` (Agrawal et al., ``kitti_new.py:run_sun_layerwise_small``; thesis-and-paper.md §1.1)
    Dropout(0.5) on the layer's features, then one InnerProduct to the classes (the original
    ``class_fc``): softmax regression. Default layers pool1, pool2, relu3, relu4, pool5 (our blob names:
    pool1, pool2, conv3, conv4, pool5, the ReLUs being in place). Solver: base_lr 0.001, batch 128,
    stepsize = 30 epochs = ``ceil(C·N/128)·30`` iterations, max_iter 2·stepsize, gamma 0.1.
``thesis`` (Torti López 2017, ``KITTINetFactory.standar``; §1.4.4)
    L1, L2: one InnerProduct on norm1 / norm2; L3–L5: InnerProduct 1000 → ReLU → InnerProduct on
    relu3–relu5 (13×13 maps, no pooling) — a 2-layer MLP. Solver: 10 000 iterations, base_lr 0.001
    (constant in effect: the step at 10 000 never fires), batch 125.

Both train through runner/solver.py's Caffe SGD (``v = m·v + lr·(g + wd·w)``, momentum 0.9, weight_decay
5e-4, weights lr_mult 1 / decay 1, biases lr_mult 2 / decay 0), mini-batches read in order from a seeded
shuffle with wrap-around
(Caffe's DataLayer over a ``convert_imageset --shuffle`` LMDB), fillers gaussian 0.005 / constant 1 (the
thesis' fc fillers; the paper's ``class_fc`` fillers are not public, the same are used). Accuracy is over
*all* test images of the split — the method — not the thesis' last-batch-of-125 figure
(thesis-and-paper.md §0.4); mean per-class accuracy is reported alongside.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf import text_format
from torch import nn

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import output_folder
from runner.probe_data import ImageSource, Sample, read_list, read_lmdb, split, sun_partition
from runner.solver import Solver

log = logging.getLogger(__name__)

DEFAULT_LAYERS = {
    "thesis": [("L1", "norm1"), ("L2", "norm2"), ("L3", "conv3"), ("L4", "conv4"), ("L5", "conv5")],
    "linear": [("L1", "pool1"), ("L2", "pool2"), ("L3", "conv3"), ("L4", "conv4"), ("L5", "pool5")],
}
"""Column label → blob, in the names of ``prototxt/kitti/bcnn_deploy.prototxt`` (in-place ReLUs)."""


@dataclass
class ProbeConfig:
    """One probe definition with its solver; see the module docstring for where each default comes from."""

    kind: str = "thesis"
    hidden: int = 1000
    mlp_layers: tuple[str, ...] = ("L3", "L4", "L5")
    dropout: float = 0.0
    iters: int | None = None
    base_lr: float = 0.001
    batch_size: int = 125
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.1
    stepsize: int | None = None
    weight_std: float = 0.005
    bias_value: float = 1.0
    solver_param: caffe_pb2.SolverParameter | None = None  # --solver: trains with this instead

    @classmethod
    def named(cls, kind: str, **overrides) -> ProbeConfig:
        if kind == "thesis":
            base = cls(kind="thesis", iters=10000, batch_size=125, dropout=0.0)
        elif kind == "linear":
            base = cls(kind="linear", mlp_layers=(), dropout=0.5, batch_size=128, iters=None)
        else:
            raise CaffeError(f"unknown probe '{kind}' (linear or thesis)")
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base

    def solver(self, max_iter: int, stepsize: int | None) -> caffe_pb2.SolverParameter:
        """The definition as a Caffe solver (SGD; "step" when the definition steps, else "fixed"), or the
        ``--solver`` file's with ``--iters`` / ``--lr`` applied."""
        if self.solver_param is not None:
            sp = caffe_pb2.SolverParameter()
            sp.CopyFrom(self.solver_param)
            if self.iters is not None:
                sp.max_iter = self.iters
            return sp
        sp = caffe_pb2.SolverParameter(type="SGD", base_lr=self.base_lr, momentum=self.momentum,
                                       weight_decay=self.weight_decay, max_iter=max_iter, lr_policy="fixed")
        if stepsize:
            sp.lr_policy, sp.gamma, sp.stepsize = "step", self.gamma, stepsize
        return sp

    def schedule(self, num_train: int) -> tuple[int, int | None]:
        """(max_iter, stepsize): explicit values, else the definition's (the paper's is per epoch)."""
        if self.iters is not None:
            return self.iters, self.stepsize
        step = self.stepsize or math.ceil(num_train / self.batch_size) * 30
        return 2 * step, step


# -- features -----------------------------------------------------------------------------------------

def providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers: CUDA first when the build has it and ``device`` allows, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    # onnxruntime-gpu lists its CUDA provider even where no GPU or driver exists, and then prints its own
    # errors while falling back: ask torch (already loaded) whether CUDA is usable before requesting it.
    usable = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if device in ("auto", "cuda") and usable:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise CaffeError("--device cuda: " + ("no CUDA device is usable here" if "CUDAExecutionProvider" in available
                                              else "this onnxruntime has no CUDA provider"))
    return ["CPUExecutionProvider"]


def open_session(path: str | Path, device: str = "auto", threads: int = 0):
    """An ORT session; the provider actually used is ``session.get_providers()[0]`` (CUDA may fall back)."""
    from runner.ort import ort_session

    try:
        return ort_session(Path(path), providers(device), threads)
    except CaffeError:
        raise
    except Exception as e:  # onnxruntime's own exception types
        raise CaffeError(f"{path}: cannot open with ONNX Runtime ({str(e).splitlines()[0]})") from None


def model_transform(path: str | Path) -> caffe_pb2.TransformationParameter | None:
    """The TEST data layer's transform_param recorded by ``egomotion export`` (None if absent)."""
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # onnx's own decode errors
        raise CaffeError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
    text = meta.get("caffe.transform_param")
    if text is None:
        return None
    tp = caffe_pb2.TransformationParameter()
    try:
        text_format.Parse(text, tp)
    except text_format.ParseError as e:
        raise CaffeError(f"{path}: its metadata caffe.transform_param is not a TransformationParameter ({e}); "
                         "export the model again with egomotion export") from None
    return tp


def extract(session, blobs: list[str], source: ImageSource, refs: list[str], batch: int = 64,
            workers: int = 4, store: Path | None = None) -> dict[str, np.ndarray]:
    """Features of ``blobs`` for every ref, flattened per item (Caffe's InnerProduct order), float32.

    Decoding and transforming run in a thread pool one batch ahead of ONNX Runtime (OpenCV and numpy
    release the GIL), so the session is rarely idle. With ``store`` the arrays are ``.npy`` memory maps
    in that folder (SUN-397's unpooled maps for tens of thousands of images do not fit in memory).
    """
    names = [o.name for o in session.get_outputs()]
    missing = [b for b in blobs if b not in names]
    if missing:
        raise CaffeError(f"the ONNX model has no output {', '.join(missing)} (outputs: {', '.join(names)}); "
                         f"export it with --outputs {','.join(blobs)}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CaffeError(f"probes need a single-input model; this one takes {', '.join(i.name for i in inputs)} "
                         "(export one tower, e.g. prototxt/kitti/bcnn_deploy.prototxt)")
    feed = inputs[0].name
    out: dict[str, np.ndarray] = {}
    chunks = [refs[i:i + batch] for i in range(0, len(refs), batch)]
    with concurrent.futures.ThreadPoolExecutor(max(2, workers)) as pool:  # one batch job + its image jobs
        pending = pool.submit(_load_batch, pool, source, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            x = pending.result()
            pending = pool.submit(_load_batch, pool, source, chunks[i + 1]) if i + 1 < len(chunks) else None
            values = session.run(blobs, {feed: x})
            start = i * batch
            for name, v in zip(blobs, values, strict=True):
                v = v.reshape(len(x), -1)
                if name not in out:
                    shape = (len(refs), v.shape[1])
                    out[name] = np.empty(shape, dtype=np.float32) if store is None else \
                        np.lib.format.open_memmap(store / f"{name.replace('/', '__')}.npy", "w+", np.float32, shape)
                out[name][start:start + len(x)] = v
    return out


def _load_batch(pool, source: ImageSource, refs: list[str]) -> np.ndarray:
    images = list(pool.map(source.load, refs)) if len(refs) > 8 else [source.load(r) for r in refs]
    return source.transformer(images)


# -- probes -------------------------------------------------------------------------------------------

class Probe(nn.Module):
    """Dropout (training only) → [InnerProduct hidden → ReLU] → InnerProduct classes."""

    def __init__(self, dim: int, classes: int, hidden: int, dropout: float, std: float, bias: float,
                 generator: torch.Generator):
        super().__init__()
        self.dropout = dropout
        sizes = [dim, hidden, classes] if hidden else [dim, classes]
        self.layers = nn.ModuleList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layer = nn.Linear(a, b)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(b, a, generator=generator) * std)
                layer.bias.fill_(bias)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout:
            x = nn.functional.dropout(x, self.dropout, True)  # Caffe scales by 1/(1-p) in TRAIN too
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


SMALL_PROBE = 1 << 20
"""Probes with fewer weights than this train single-threaded on the CPU: their ops are too small to gain
from intra-op threads, and on a busy machine the threads' barriers cost 100x the work itself."""


@contextlib.contextmanager
def _cpu_threads(count: int | None):
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int, config: ProbeConfig, hidden: int, seed: int
                ) -> tuple[Probe, list[float]]:
    """Caffe's SGD on a probe (see the module docstring); returns the probe and its per-iteration losses."""
    weights = x.shape[1] * (hidden or classes) + hidden * classes
    small = x.device.type == "cpu" and weights < SMALL_PROBE
    with _cpu_threads(1 if small else None):
        return _train_probe(x, y, classes, config, hidden, seed)


def _train_probe(x, y, classes, config, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    probe = Probe(x.shape[1], classes, hidden, config.dropout, config.weight_std, config.bias_value, g).to(x.device)
    max_iter, step = config.schedule(len(x))
    params = [p for layer in probe.layers for p in (layer.weight, layer.bias)]
    mults = [m for _ in probe.layers for m in ((1.0, 1.0), (2.0, 0.0))]  # weights 1/1, biases 2/0
    solver = Solver(config.solver(max_iter, step), params, [m[0] for m in mults], [m[1] for m in mults])
    probe.train()
    losses = solver_loop(lambda xb, yb: nn.functional.cross_entropy(probe(xb), yb), solver, x, y,
                         config.batch_size, seed)
    probe.eval()
    return probe, losses


def solver_loop(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], solver: Solver, x: torch.Tensor,
                y: torch.Tensor, batch: int, seed: int) -> list[float]:
    """``solver.sp.max_iter`` iterations of Caffe's Solver::Step on in-memory features: mini-batches read in
    order from a seeded shuffle with wrap-around (a DataLayer over a ``convert_imageset --shuffle`` LMDB);
    returns the per-iteration losses."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x))).to(x.device)
    torch.manual_seed(seed)  # dropout masks
    losses = []
    for it in range(solver.sp.max_iter):
        idx = order[(it * batch + torch.arange(batch, device=x.device)) % len(x)]
        for p in solver.params:
            p.grad = None
        loss = loss_of(x[idx], y[idx])
        loss.backward()
        solver.apply_update()
        solver.iter += 1
        losses.append(loss.detach())  # read once at the end: a GPU loop never waits for the host
    return torch.stack(losses).tolist() if losses else []


@torch.no_grad()
def evaluate(probe: Probe, x: torch.Tensor, y: torch.Tensor, classes: int, batch: int = 1024) -> tuple[float, float]:
    """(accuracy, mean per-class accuracy) over every test item."""
    pred = torch.cat([probe(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    correct = (pred == y).float()
    per_class = [correct[y == c].mean().item() for c in [*range(classes), -1] if bool((y == c).any())]
    return correct.mean().item(), float(np.mean(per_class))


# -- the experiment -----------------------------------------------------------------------------------

@dataclass
class Result:
    method: str
    layer: str
    blob: str
    per_class: int
    partition: int
    accuracy: float
    class_mean_accuracy: float
    train_images: int
    test_images: int
    final_loss: float


@dataclass
class Experiment:
    """Everything one ``egomotion probe`` run needs, as plain data."""

    nets: dict[str, str]                       # method → .onnx
    layers: list[tuple[str, str]]              # column label → blob
    per_class: list[int]
    partitions: list[tuple[list[Sample], list[Sample] | None]]  # (train pool, test pool) per partition
    config: ProbeConfig
    transform: caffe_pb2.TransformationParameter | None = None
    resize: tuple[int, int] | None = None
    pad_square: bool = False
    test_per_class: int | str | None = None  # "same": as many as training images (the thesis' SUN test LMDBs)
    seed: int = 0
    batch: int = 64
    device: str = "auto"
    feature_dir: Path | None = None            # memory-map features there (one sub-folder per method)
    timings: dict[str, float] = field(default_factory=dict)
    providers_used: dict[str, str] = field(default_factory=dict)


def torch_device(device: str) -> torch.device:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if device == "cuda":
        raise CaffeError("--device cuda: PyTorch sees no CUDA device")
    return torch.device("cpu")


def run(exp: Experiment) -> list[Result]:
    """Extract every needed image once per net, then train and test every probe."""
    splits = []
    for p, (train_pool, test_pool) in enumerate(exp.partitions):
        for n in exp.per_class:
            k = n if exp.test_per_class == "same" else exp.test_per_class
            train, test = split(train_pool, test_pool, n, exp.seed, p, k)
            splits.append((p, n, train, test))
    refs = sorted({s.ref for _, _, tr, te in splits for s in (*tr, *te)})
    row = {r: i for i, r in enumerate(refs)}
    # Probes see contiguous class indices; a test label never seen in training can only be wrong (-1).
    index = {label: i for i, label in enumerate(sorted({s.label for _, _, tr, _ in splits for s in tr}))}
    classes = len(index)
    device = torch_device(exp.device)
    blobs = list(dict.fromkeys(b for _, b in exp.layers))
    results = []
    for method, path in exp.nets.items():
        session = open_session(path, exp.device, threads=torch.get_num_threads())  # the verb's thread choice
        exp.providers_used[method] = session.get_providers()[0]
        shape = session.get_inputs()[0].shape
        tp = exp.transform or model_transform(path) or caffe_pb2.TransformationParameter()
        source = ImageSource(tp, tuple(int(d) for d in shape[1:]), exp.resize, exp.pad_square)
        t0 = time.perf_counter()
        store = None
        if exp.feature_dir is not None:
            store = exp.feature_dir / method.replace("/", "_")
            store.mkdir(parents=True, exist_ok=True)
        features = extract(session, blobs, source, refs, exp.batch, store=store)
        exp.timings[f"{method}: features ({len(refs)} images)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for label, blob in exp.layers:
            hidden = exp.config.hidden if label in exp.config.mlp_layers else 0
            feats = features[blob]
            for p, n, train, test in splits:
                tr = np.array([row[s.ref] for s in train])
                te = np.array([row[s.ref] for s in test])
                ytr = torch.tensor([index[s.label] for s in train], device=device)
                yte = torch.tensor([index.get(s.label, -1) for s in test], device=device)
                seed = exp.seed * 1_000_003 + p * 1009 + n
                probe, losses = train_probe(torch.from_numpy(feats[tr]).to(device), ytr, classes, exp.config,
                                            hidden, seed)
                acc, class_acc = evaluate(probe, torch.from_numpy(feats[te]).to(device), yte, classes)
                results.append(Result(method, label, blob, n, p, acc, class_acc, len(train), len(test),
                                      losses[-1] if losses else float("nan")))
                log.info("%s %s (%s) N=%d partition %d: %.2f %%", method, label, blob, n, p, 100 * acc)
        exp.timings[f"{method}: probes ({len(exp.layers)} layers x {len(splits)} splits)"] = time.perf_counter() - t0
    return results


# -- CLI ----------------------------------------------------------------------------------------------

def _pairs(texts: list[str], what: str) -> dict[str, str]:
    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise CaffeError(f"{what}: expected NAME=VALUE, got '{text}'")
        if name in out:
            raise CaffeError(f"{what}: '{name}' given twice")
        out[name] = value
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise CaffeError(f"{what}: expected positive integers separated by commas, got '{text}'")
    return values


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    nets = _pairs(args.net, "--net")
    if not nets:
        raise CaffeError("give at least one --net NAME=model.onnx (made by egomotion export)")
    for name, path in nets.items():
        if not Path(path).is_file():
            raise CaffeError(f"--net {name}: no such file {path}")
    layers = (list(_pairs(args.layers.split(","), "--layers").items()) if args.layers
              else DEFAULT_LAYERS[args.probe])
    overrides = dict(iters=args.iters, base_lr=args.lr, batch_size=args.batch_size, hidden=args.hidden,
                     dropout=args.dropout)
    if args.mlp_layers is not None:
        overrides["mlp_layers"] = tuple(v for v in args.mlp_layers.split(",") if v)
    config = ProbeConfig.named(args.probe, **overrides)
    if args.solver:
        from converter.io import read_solver
        from runner.solver import check_solver

        config.solver_param = read_solver(args.solver)
        if args.lr is not None:
            config.solver_param.base_lr = args.lr
        check_solver(config.solver_param, args.solver)
    partitions: list[tuple[list[Sample], list[Sample] | None]] = []
    if args.sun_dir:
        for k in _ints(args.sun_partitions, "--sun-partitions"):
            train, test, _ = sun_partition(args.sun_dir, k, args.sun_images)
            partitions.append((train, test))
    else:
        if args.train_list:
            train = read_list(args.train_list, args.root)
        elif args.train_lmdb:
            train = read_lmdb(args.train_lmdb)
        else:
            raise CaffeError("give the images: --train-list (and --test-list), --train-lmdb, or --sun-dir")
        test = read_list(args.test_list, args.root) if args.test_list else \
            read_lmdb(args.test_lmdb) if args.test_lmdb else None
        partitions = [(train, test)] * args.splits
    transform = None
    if args.mean_file or args.mean_value or args.scale is not None or args.crop_size:
        transform = caffe_pb2.TransformationParameter()
        if args.mean_file:
            transform.mean_file = args.mean_file
        transform.mean_value.extend(args.mean_value)
        if args.scale is not None:
            transform.scale = args.scale
        if args.crop_size:
            transform.crop_size = args.crop_size
    resize = tuple(_ints(args.resize, "--resize")) if args.resize else None
    if resize is not None and len(resize) != 2:
        raise CaffeError("--resize: expected H,W")
    test_per_class = args.test_per_class
    if test_per_class not in (None, "same"):
        test_per_class = _ints(test_per_class, "--test-per-class")[0]
    return Experiment(nets, layers, _ints(args.per_class, "--per-class"), partitions, config, transform, resize,
                      args.pad_square, test_per_class, args.seed, args.extract_batch, args.device)


def probe(args: argparse.Namespace) -> int:
    from runner import threads
    from runner.report import write_report

    exp = experiment_from_args(args)
    started = time.perf_counter()
    with output_folder(args.out, "-o", discard=True) as out:  # an error leaves no half-made results folder
        exp.feature_dir = out / "features"
        try:
            results = run(exp)
        finally:
            if not args.keep_features:
                shutil.rmtree(exp.feature_dir, ignore_errors=True)
    exp.timings["total"] = time.perf_counter() - started
    files = write_report(results, out, exp.config.kind, thesis=args.thesis_table)
    meta = {"probe": asdict(exp.config), "layers": exp.layers, "per_class": exp.per_class, "seed": exp.seed,
            "partitions": len(exp.partitions), "nets": exp.nets, "providers": exp.providers_used,
            "timings_s": exp.timings, "threads": threads.describe(), "results": [asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    print(files["markdown"].read_text())
    print(f"wrote {', '.join(str(f) for f in files.values())}, {out / 'results.json'} "
          f"({', '.join(sorted(set(exp.providers_used.values())))}; {threads.describe() or 'torch default threads'})")
    return 0
