"""``egomotion test``: ``caffe test`` — score a model on its TEST-phase data for N batches.

As ``tools/caffe.cpp:test``: each batch's output elements are logged (``Batch i, name = v``), the net
loss is averaged (``Loss: x``) and every output element is averaged over the batches (float sums) and
printed as ``name = mean`` (with ``(* w = w·mean loss)`` for loss outputs). The final lines also go to
stdout, one ``name = value`` per line, for scripts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net
from converter.net import CaffeNet
from converter.weights import load_weights
from runner import threads
from runner.logs import Log, glog_session
from runner.netsetup import comma_list, input_shapes, output_order, pick_device
from runner.solver import fmt

f32 = np.float32


@dataclass
class Score:
    """``means``: every output element averaged over the batches (keys ``name``, or ``name[k]`` for outputs
    with several elements) and the mean net loss under ``""``; ``last``: the last batch's elements (what a
    script reading ``net.blobs`` after the loop sees, e.g. the thesis's accuracy)."""

    means: dict[str, float]
    last: dict[str, float]


def score(model: str, weights: list[str], iterations: int, gpu: str | None = None, phase: str = "TEST",
          level: int = 0, stages: list[str] | None = None, log: Log | None = None) -> Score:
    """``caffe test``'s loop over ``iterations`` batches, logged as Caffe logs it."""
    from runner.data import NetFeeder

    with glog_session(log) as log:
        if iterations <= 0:
            raise CaffeError(f"--iterations must be > 0, got {iterations}")
        if not weights:
            raise CaffeError("need --weights to score (Caffe refuses to score filler values too)")
        state = net_state(phase, level, stages or [])
        proto = filter_net(read_net(model), state, model)
        phase_id = caffe_pb2.Phase.Value(phase.upper()) if isinstance(phase, str) else phase
        net = CaffeNet(proto, input_shapes(proto, phase_id))
        missing = [t for layer in net.data_layers if layer.type == "Input" for t in layer.tops]
        if missing:
            raise CaffeError(f"{model}: Input layer tops ({', '.join(missing)}) have no data to score on; "
                             "use a net with Data layers")
        for w in weights:
            load_weights(net, w)
        device = pick_device(gpu, log)
        net.to(device)
        names = output_order(net)
        loss_weights = dict(net.loss_blobs())
        log.line("caffe.cpp:290", f"Running for {iterations} iterations.")
        total, loss, flat = None, f32(0), np.zeros(0, f32)
        owners: list[str] = []
        with NetFeeder(proto, phase_id, device=str(device)) as feeder, torch.no_grad():
            for i in range(iterations):
                threads.rebalance(log)
                blobs = net(feeder.next())
                loss = f32(loss + f32(float(net.loss(blobs))))
                values = []
                for name in names:
                    v = blobs[name].detach().float().cpu().reshape(-1).numpy()
                    for x in v:
                        log.line("caffe.cpp:313", f"Batch {i}, {name} = {fmt(float(x))}")
                    values.append(v)
                    if i == 0:
                        owners += [name if v.size == 1 else f"{name}[{k}]" for k in range(v.size)]
                flat = np.concatenate(values).astype(f32) if values else np.zeros(0, f32)
                total = flat if total is None else (total + flat).astype(f32)
        mean_loss = float(loss / f32(iterations))
        log.line("caffe.cpp:318", f"Loss: {fmt(mean_loss)}")
        results = {"": mean_loss}
        for key, t in zip(owners, total if total is not None else [], strict=True):
            mean = float(f32(t / f32(iterations)))
            w = loss_weights.get(key.split("[")[0], 0.0)
            extra = f" (* {fmt(w)} = {fmt(float(f32(w) * f32(mean)))} loss)" if w else ""
            log.line("caffe.cpp:330", f"{key} = {fmt(mean)}{extra}")
            results[key] = mean
        return Score(results, {key: float(v) for key, v in zip(owners, flat, strict=True)})


def test(args: argparse.Namespace) -> int:
    weights = comma_list(args.weights)
    results = score(args.model, weights, args.iterations, args.gpu, args.phase, args.level,
                    comma_list(args.stage)).means
    print(f"loss = {fmt(results.pop(''))}")
    for name, value in results.items():
        print(f"{name} = {fmt(value)}")
    return 0
