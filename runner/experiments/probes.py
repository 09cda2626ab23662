"""A probe run of an experiment (``run { probe { … } }``): per-layer softmax probes on ONNX Runtime features.

For each pre-trained snapshot: its tower (``probe.deploy``, layers copied by name) is exported to ONNX with
the probed blobs as outputs and checked against ONNX Runtime; the images of the ``probe.data`` stage's lists
are decoded, padded and resized as that stage says and transformed as the probe net's Data layer says; ONNX
Runtime computes their features once. Each probe head is the run's net (the solver's ``net``) filtered by the
layer's NetState stage, with the tower's layers replaced by Input blobs of those features, and it trains
with the run's solver (runner/solver.py, Caffe's SGD: every value from the prototxts), batches of the net's
TRAIN batch size. Accuracy is over every test image of the split.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from converter import caffe_pb2, experiment_pb2
from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net, read_solver
from converter.net import CaffeNet
from runner.experiments.spec import Experiment, merge
from runner.probe_data import ImageSource, read_list


def pretrained(exp: Experiment, run: experiment_pb2.RunParameter) -> dict[str, Path]:
    """``NAME=path`` entries (``{scale}`` filled in); every file must exist before any work starts."""
    out = {}
    for entry in run.probe.pretrained:
        name, _, path = entry.rpartition("=")
        path = Path(path.format(scale=exp.scale))
        if not path.is_file():
            raise CaffeError(f"run '{run.name}': no pre-trained snapshot {path} for {name or path.stem} "
                             "(train it first, e.g. make train EXP=kitti)")
        out[name or path.stem] = path
    return out


def head(probe_net: caffe_pb2.NetParameter, stage: str, tower: set[str], batch: int, dims: dict[str, int]
         ) -> caffe_pb2.NetParameter:
    """The probe net's TRAIN layers for ``stage`` minus the tower and the data, fed by Input blobs."""
    kept = [lp for lp in filter_net(probe_net, net_state("TRAIN", 0, [stage])).layer
            if lp.name not in tower and lp.type not in ("Data", "ImageData", "Input")]
    made = {t for lp in kept for t in lp.top}
    needed = list(dict.fromkeys(b for lp in kept for b in lp.bottom if b not in made))
    net = caffe_pb2.NetParameter(name=f"{probe_net.name}_{stage}")
    inputs = net.layer.add(name="features", type="Input")
    for blob in needed:
        inputs.top.append(blob)
        inputs.input_param.shape.add().dim.extend([batch] if blob not in dims else [batch, dims[blob]])
    for lp in kept:
        lp.ClearField("include")
        net.layer.add().CopyFrom(lp)
    return net


def run_probe(exp: Experiment, data_root: Path, folder: Path, run: experiment_pb2.RunParameter,
              gpu: str | None = None) -> list[dict]:
    """Every probe of ``run``: features by ONNX Runtime (its CUDA provider when ``gpu`` is given and it has
    one), heads trained by Caffe's solver on the device ``gpu`` names (the CPU without)."""
    from runner.deploy import build_deploy
    from runner.export import export_model
    from runner.netsetup import cuda_device
    from runner.probe import evaluate, extract, open_session, solver_loop
    from runner.solver import Solver

    device = cuda_device(gpu)

    folder.mkdir(parents=True, exist_ok=True)
    stage = exp.data_stage(run.probe.data)
    images = stage.image_set
    lists = data_root / stage.folder if stage.folder else data_root
    sp = read_solver(exp.path(run.solver))
    merge(sp, run.solver_override)
    probe_net = read_net(exp.path(Path(sp.net).name))
    tower_file = exp.path(run.probe.deploy)
    tower = {lp.name for lp in read_net(tower_file).layer}
    data_layer = next((lp for lp in probe_net.layer if lp.type == "Data"), None)
    if data_layer is None:
        raise CaffeError(f"{exp.path(Path(sp.net).name)}: no Data layer to take the transform and batch size from")
    batch = data_layer.data_param.batch_size
    layers = list(run.probe.layer)
    blobs = {}
    for stage_name in layers:
        h = head(probe_net, stage_name, tower, batch, {})
        blobs[stage_name] = [b for b in h.layer[0].top if b != "label"]
    outputs = list(dict.fromkeys(b for names in blobs.values() for b in names))
    splits = [(k, n, read_list(lists / f"train_{n}_p{k}.txt"), read_list(lists / f"test_{n}_p{k}.txt"))
              for k in (list(images.partition) or [1]) for n in images.per_class]
    refs = sorted({s.ref for _, _, tr, te in splits for s in (*tr, *te)})
    row = {r: i for i, r in enumerate(refs)}
    resize = (images.resize_height, images.resize_width) if images.resize_height else None
    records = []
    for name, weights in pretrained(exp, run).items():
        onnx_path = folder / f"{name}.onnx"
        with contextlib.redirect_stderr(io.StringIO()):
            net, plan = build_deploy(tower_file, [weights], outputs)
            export_model(net, plan, onnx_path)
        # the run's own thread count (--threads), as its trainings: jobs side by side do not oversubscribe
        session = open_session(onnx_path, "auto" if device.type == "cuda" else "cpu", threads=torch.get_num_threads())
        shape = session.get_inputs()[0].shape
        source = ImageSource(data_layer.transform_param, tuple(int(d) for d in shape[1:]), resize, images.pad_square)
        start = time.perf_counter()
        features = extract(session, outputs, source, refs)
        seconds = time.perf_counter() - start
        for stage_name in layers:
            dims = {b: features[b].shape[1] for b in blobs[stage_name]}
            proto = head(probe_net, stage_name, tower, batch, dims)
            for k, n, train, test in splits:
                seed = sp.random_seed + 1009 * k + n
                net = CaffeNet(proto, generator=torch.Generator().manual_seed(seed)).to(device)
                solver = Solver(sp, list(net.params), [lb.lr_mult for lb in net.learnable],
                                [lb.decay_mult for lb in net.learnable])
                feed = blobs[stage_name][0]
                x = torch.from_numpy(features[feed][[row[s.ref] for s in train]]).to(device)
                y = torch.tensor([s.label for s in train], dtype=torch.float32, device=device)

                def loss_of(xb, yb, net=net, feed=feed):
                    return net.loss(net({feed: xb, "label": yb}))

                net.train()
                losses = solver_loop(loss_of, solver, x, y, batch, seed)
                net.eval()
                xt = torch.from_numpy(features[feed][[row[s.ref] for s in test]]).to(device)
                yt = torch.tensor([s.label for s in test], device=device)
                top = _logits_blob(proto)
                acc, class_acc = evaluate(lambda xb, net=net, feed=feed, top=top: _logits(net, feed, top, xb, batch),
                                          xt, yt, int(yt.max()) + 1)
                records.append({"run": run.name, "method": name, "layer": stage_name, "blob": feed, "per_class": n,
                                "partition": k, "accuracy": acc, "class_mean_accuracy": class_acc,
                                "train_images": len(train), "test_images": len(test),
                                "final_loss": losses[-1] if losses else float("nan"),
                                "feature_seconds": round(seconds, 1),
                                "feature_provider": session.get_providers()[0], "head_device": str(device)})
    (folder / "result.json").write_text(json.dumps(records, indent=1))
    return records


def _logits_blob(proto: caffe_pb2.NetParameter) -> str:
    loss = next(lp for lp in proto.layer if lp.type == "SoftmaxWithLoss")
    return loss.bottom[0]


@torch.no_grad()
def _logits(net: CaffeNet, feed: str, top: str, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The head's scores for ``x``, in batches of the net's own size (the last one padded by repetition)."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        padded = xb[torch.arange(batch, device=x.device) % len(xb)]
        out.append(net({feed: padded, "label": torch.zeros(batch, device=x.device)})[top][:len(xb)])
    return torch.cat(out)


def table(records: list[dict]) -> list[str]:
    """Accuracy (%) per layer, mean over partitions, a row per method and N."""
    layers = list(dict.fromkeys(r["layer"] for r in records))
    lines = ["| method | N/class | " + " | ".join(layers) + " |", "|---|---|" + "---|" * len(layers)]
    for method in dict.fromkeys(r["method"] for r in records):
        for n in sorted({r["per_class"] for r in records}):
            cells = [np.mean([r["accuracy"] for r in records if (r["method"], r["per_class"], r["layer"])
                              == (method, n, layer)]) for layer in layers]
            lines.append(f"| {method} | {n} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + " |")
    return lines
