"""``egomotion time``: ``caffe time`` — average forward and backward time per layer and per iteration.

As ``tools/caffe.cpp:time``: one forward/backward to warm up, then ``--iterations`` passes in which each
layer runs on its own (forward in order, backward in reverse order, each layer's backward fed by the
gradients its consumers produced), timed per layer; then Caffe's summary lines. Data layers are timed as
reading one batch; Input tops are zeros, as Caffe's freshly allocated blobs are. A last line times the
same iterations the way training runs them (one autograd graph for the whole net), which is the figure
to compare with ``caffe time``'s Forward-Backward.
"""

from __future__ import annotations

import argparse
import time

import torch

from converter.errors import CaffeError
from converter.io import filter_net, net_state, read_net
from converter.net import CaffeNet
from converter.weights import load_weights
from runner import threads
from runner.logs import Log, glog_session
from runner.netsetup import comma_list, input_shapes, pick_device
from runner.solver import fmt


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _inputs(net: CaffeNet, feeder, device: torch.device) -> dict[str, torch.Tensor]:
    batch = feeder.next() if feeder is not None and feeder.sources else {}
    for t, shape in net.input_shapes().items():
        if t not in batch:
            batch[t] = torch.zeros(shape, device=device)
    return batch


def _layerwise(net: CaffeNet, inputs: dict[str, torch.Tensor], clock: _Clock, fwd: list[float], bwd: list[float],
               data_time: float) -> tuple[float, float]:
    """One forward and one backward, layer by layer; adds each layer's seconds to fwd/bwd."""
    for p in net.params:
        p.grad = None
    current: dict[str, torch.Tensor] = {}
    records: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = []
    forward_total = 0.0
    loss_weights = net.loss_weights
    for i, (lp, layer) in enumerate(zip(net.layer_params, net.layers, strict=True)):
        if layer.is_data:
            for t in layer.tops:
                current[t] = inputs[t].detach().requires_grad_(False)
            fwd[i] += data_time  # the batch is read once for all data layers: the first one carries it
            forward_total += data_time
            data_time = 0.0
            records.append(None)
            continue
        bottoms = [current[b] for b in lp.bottom]
        start = clock.now()
        tops = layer(bottoms, net.layer_blobs(i))
        elapsed = clock.now() - start
        fwd[i] += elapsed
        forward_total += elapsed
        leaves = []
        for name, t in zip(lp.top, tops, strict=True):
            leaf = t.detach().requires_grad_(t.requires_grad)
            current[name] = leaf
            leaves.append(leaf)
        records.append((list(tops), leaves))
    backward_total = 0.0
    for i in range(len(net.layers) - 1, -1, -1):
        rec = records[i]
        if rec is None:
            continue
        tops, leaves = rec
        roots, grads = [], []
        for top, leaf, w in zip(tops, leaves, loss_weights[i], strict=True):
            g = leaf.grad
            if w:
                g = torch.full_like(top, w) if g is None else g + w
            if g is not None and top.requires_grad:
                roots.append(top)
                grads.append(g)
        start = clock.now()
        if roots:
            torch.autograd.backward(roots, grads)
        elapsed = clock.now() - start
        bwd[i] += elapsed
        backward_total += elapsed
    return forward_total, backward_total


def time_net(model: str, iterations: int = 50, gpu: str | None = None, phase: str = "TRAIN", level: int = 0,
             stages: list[str] | None = None, weights: list[str] | None = None, log: Log | None = None) -> dict:
    """Run the benchmark; returns milliseconds: per layer (forward, backward), and the averages."""
    from runner.data import NetFeeder

    with glog_session(log) as log:
        if iterations <= 0:
            raise CaffeError(f"--iterations must be > 0, got {iterations}")
        state = net_state(phase, level, stages or [])
        phase_id = state.phase
        proto = filter_net(read_net(model), state, model)
        net = CaffeNet(proto, input_shapes(proto, phase_id))
        for w in weights or []:
            load_weights(net, w)
        device = pick_device(gpu, log)
        net.to(device)
        clock = _Clock(device)
        n = len(net.layers)
        with NetFeeder(proto, phase_id, seed=0, device=str(device)) as feeder:
            log.line("caffe.cpp:352", "Performing Forward")
            warm = [0.0] * n
            t0 = clock.now()
            inputs = _inputs(net, feeder, device)
            data_time = clock.now() - t0
            _layerwise(net, inputs, clock, warm, list(warm), data_time)
            log.line("caffe.cpp:357", "*** Benchmark begins ***")
            log.line("caffe.cpp:358", f"Testing for {iterations} iterations.")
            fwd, bwd = [0.0] * n, [0.0] * n
            total_fwd = total_bwd = 0.0
            total_start = clock.now()
            for j in range(iterations):
                threads.rebalance(log)
                t0 = clock.now()
                inputs = _inputs(net, feeder, device)
                data_time = clock.now() - t0
                f, b = _layerwise(net, inputs, clock, fwd, bwd, data_time)
                total_fwd += f
                total_bwd += b
                log.line("caffe.cpp:386", f"Iteration: {j + 1} forward-backward time: {fmt((f + b) * 1e3)} ms.")
            total = clock.now() - total_start
            log.line("caffe.cpp:389", "Average time per layer: ")
            per_layer = {}
            for i, lp in enumerate(net.layer_params):
                f_ms, b_ms = fwd[i] * 1e3 / iterations, bwd[i] * 1e3 / iterations
                per_layer[lp.name] = (f_ms, b_ms)
                log.line("caffe.cpp:392", f"{lp.name:>10}\tforward: {fmt(f_ms)} ms.")
                log.line("caffe.cpp:395", f"{lp.name:>10}\tbackward: {fmt(b_ms)} ms.")
            result = {"layers": per_layer, "forward_ms": total_fwd * 1e3 / iterations,
                      "backward_ms": total_bwd * 1e3 / iterations, "forward_backward_ms": total * 1e3 / iterations}
            log.line("caffe.cpp:400", f"Average Forward pass: {fmt(result['forward_ms'])} ms.")
            log.line("caffe.cpp:402", f"Average Backward pass: {fmt(result['backward_ms'])} ms.")
            log.line("caffe.cpp:404", f"Average Forward-Backward: {fmt(result['forward_backward_ms'])} ms.")
            log.line("caffe.cpp:406", f"Total Time: {fmt(total * 1e3)} ms.")
            # the way training runs it: one graph, one backward
            start = clock.now()
            for _ in range(iterations):
                threads.rebalance(log)
                for p in net.params:
                    p.grad = None
                blobs = net(_inputs(net, feeder, device))
                loss = net.loss(blobs)
                if loss.requires_grad:
                    loss.backward()
            graph_ms = (clock.now() - start) * 1e3 / iterations
            result["graph_forward_backward_ms"] = graph_ms
            log.line("time_cmd.py:150", f"Average Forward-Backward as one autograd graph (as in training): "
                                      f"{fmt(graph_ms)} ms.")
            log.line("caffe.cpp:407", "*** Benchmark ends ***")
        return result


def time_command(args: argparse.Namespace) -> int:
    result = time_net(args.model, args.iterations, args.gpu, args.phase, args.level,
                      comma_list(args.stage),
                      comma_list(args.weights))
    print(f"forward {result['forward_ms']:.3f} ms, backward {result['backward_ms']:.3f} ms, "
          f"forward-backward {result['forward_backward_ms']:.3f} ms per iteration "
          f"({result['graph_forward_backward_ms']:.3f} ms as one autograd graph)")
    return 0
