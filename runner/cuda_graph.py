"""One training pass of a Caffe net (forward, loss, backward) captured as CUDA graphs and replayed.

A Caffe net has fixed shapes, so its pass can be recorded once: ``torch.cuda.make_graphed_callables`` records
the forward (with Caffe's loss) and the backward as two graphs, and each later pass is two launches instead
of one per operator — on a GPU the thesis MNIST net's step was dominated by ~340 kernel launches, not by
the GPU's work. The solver's update stays eager (a handful of fused ``_foreach`` launches), so learning-rate
policies and snapshots are unchanged. Opt-in (``egomotion train --gpu 0 --cuda-graph``): the kernels are the
eager ones, so the numbers should be the eager numbers, which ``benchmarks/gpu_check.py`` checks on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from converter.net import CaffeNet

Blobs = dict[str, torch.Tensor]


class _Pass(nn.Module):
    """The net's forward and loss as a module of positional tensors (what graph capture takes)."""

    def __init__(self, net: CaffeNet, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.net, self.inputs, self.outputs = net, inputs, outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blobs = self.net(dict(zip(self.inputs, tensors, strict=True)))
        return (self.net.loss(blobs), *(blobs[name] for name in self.outputs))


def graph_pass(net: CaffeNet, batch: Blobs, outputs: list[str]) -> Callable[[Blobs], tuple[torch.Tensor, Blobs]]:
    """The captured pass for batches shaped like ``batch``: ``run(batch) -> (loss, {output: blob})``, whose
    backward (``loss.backward()``) is the captured one. The capture's warm-up runs the pass three times;
    every blob of the net (BatchNorm's statistics too) and the random streams are put back as they were.
    The returned tensors are the graph's own buffers: the next pass overwrites them."""
    names = list(batch)
    saved = [p.detach().clone() for p in net.params]
    devices = [t.device for t in batch.values() if t.is_cuda][:1]
    try:
        # the warm-up draws Dropout masks: the random streams are put back too, so this iteration's pass
        # draws what the eager one would
        with torch.random.fork_rng(devices=devices):
            graphed = torch.cuda.make_graphed_callables(_Pass(net, names, outputs), tuple(batch[n] for n in names),
                                                        allow_unused_input=True)
    finally:
        with torch.no_grad():
            for p, value in zip(net.params, saved, strict=True):
                p.copy_(value)

    def run(b: Blobs) -> tuple[torch.Tensor, Blobs]:
        loss, *tops = graphed(*(b[n] for n in names))
        return loss, dict(zip(outputs, tops, strict=True))

    return run
