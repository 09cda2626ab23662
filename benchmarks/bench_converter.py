"""Speed of the converted CaffeNet against hand-written PyTorch, and the AlexNet build time.

For each net in ``shared/reference/timing/`` (Input layers, the experiments' shapes; TRAIN phase like
``caffe time``) this builds the CaffeNet and the hand-written module of ``benchmarks/handwritten.py``,
copies the weights across and checks that loss and every weight gradient agree (1e-4), then times one
forward and ``loss.backward()`` of each on the same inputs with the same number of threads: warm-up
iterations, then N measured iterations, the two implementations interleaved (alternating which goes
first) so that drift of a shared machine hits both alike; the medians are reported. Caffe's own figure
for the same thread count (``caffe-times.md``) is shown for context.

It also times building the AlexNet CaffeNet (``conformance/07_bvlc_alexnet_train_val.prototxt``, TRAIN,
data 256x3x227x227), whose goal is under a second.

Writes a markdown table to stdout and ``benchmarks/results/converter.{md,json}``.

    .venv/bin/python benchmarks/bench_converter.py [--quick] [--threads N] [--iters N] [--nets a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import handwritten  # noqa: E402
from common import emit, figure, net_forward_flops, ref  # noqa: E402
from gemm_peak import gemm_runs, peak_gflops  # noqa: E402

from converter.io import filter_net, net_state, read_net  # noqa: E402
from converter.net import CaffeNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
TIMING = REFERENCE / "timing"
ALEXNET = REFERENCE / "conformance" / "07_bvlc_alexnet_train_val.prototxt"
RESULTS = Path(__file__).resolve().parent / "results"

NETS = ["lenet_b64", "thesis_mnist_egomotion_b125", "thesis_kitti_egomotion_b16"]
ITERS = {"lenet_b64": (50, 20), "thesis_mnist_egomotion_b125": (20, 10), "thesis_kitti_egomotion_b16": (10, 3)}
"""Measured iterations per net: (default, --quick)."""
GOAL_RATIO = 1.05
GOAL_BUILD_S = 1.0
TOLERANCE = 1e-4


def caffe_times(path: Path = REFERENCE / "caffe-times.md") -> dict[tuple[str, int], dict[str, float]]:
    """Caffe's forward / backward / forward+backward ms by (net, threads), read from its markdown table."""
    times: dict[tuple[str, int], dict[str, float]] = {}
    if not path.exists():
        return times
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not re.fullmatch(r"[\w.-]+", cells[0].split(" ")[0]):
            continue
        try:
            threads, fwd, bwd, total = (float(c.replace(",", "")) for c in cells[2:6])
        except ValueError:
            continue
        times[(cells[0].split(" ")[0], int(threads))] = {"forward_ms": fwd, "backward_ms": bwd, "total_ms": total}
    return times


def gpu_peak_gflops(device: torch.device) -> float:
    return statistics.median(gemm_runs(4096, 5, str(device)))


def make_inputs(net: CaffeNet, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Random data for every Input top: N(0,1) images, and labels valid for the loss layer reading them."""
    classes = {lp.bottom[1]: net.blob_shapes[lp.bottom[0]][1]
               for lp in net.layer_params if lp.type == "SoftmaxWithLoss"}
    inputs = {}
    for name, shape in net.input_shapes().items():
        if name in classes:
            value = torch.randint(0, classes[name], shape, generator=generator).float()
        else:
            value = torch.randn(shape, generator=generator)
        inputs[name] = value.to(device)
    return inputs


def check_agreement(name: str, net: CaffeNet, hand: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Loss and every weight gradient of both within TOLERANCE (same seed, so the same dropout mask)."""
    torch.manual_seed(0)
    loss_c = net.loss(net(inputs))
    loss_c.backward()
    torch.manual_seed(0)
    loss_h = hand(inputs)
    loss_h.backward()
    diff = abs(loss_c.item() - loss_h.item())
    assert diff <= TOLERANCE, f"{name}: losses differ: CaffeNet {loss_c.item()} vs hand-written {loss_h.item()}"
    for path, layer in handwritten.LAYER_MAP[name].items():
        module = hand.get_submodule(path)
        i = net.layer_by_name(layer)
        for blob, mine in zip(net.blob_uses[i], (module.weight, module.bias), strict=True):
            theirs = net.params[blob.learnable].grad.view(blob.shape)
            torch.testing.assert_close(mine.grad, theirs, rtol=TOLERANCE, atol=TOLERANCE,
                                       msg=lambda m, p=path: f"{name}: gradient of {p} differs: {m}")
    return diff


def time_pair(steps: dict[str, tuple], warmup: int, iters: int, device: torch.device,
              clock=time.perf_counter) -> dict[str, dict]:
    """Forward and forward+backward ms of each step per iteration, the steps interleaved (alternating
    which goes first), with their medians and minima."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = list(steps)
    samples = {n: {"forward": [], "total": []} for n in names}
    for i in range(warmup + iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            run, params = steps[name]
            for p in params:
                p.grad = None
            sync()
            start = clock()
            loss = run()
            sync()
            mid = clock()
            loss.backward()
            sync()
            end = clock()
            if i >= warmup:
                samples[name]["forward"].append((mid - start) * 1e3)
                samples[name]["total"].append((end - start) * 1e3)
    return {n: {"forward_ms": statistics.median(s["forward"]), "total_ms": statistics.median(s["total"]),
                "total_min_ms": min(s["total"]), "total_samples_ms": s["total"]} for n, s in samples.items()}


def bench_net(name: str, warmup: int, iters: int, threads: int, device: torch.device,
              caffe: dict[tuple[str, int], dict[str, float]], clock=time.perf_counter) -> dict:
    proto = filter_net(read_net(TIMING / f"{name}.prototxt"), net_state("TRAIN"))
    net = CaffeNet(proto).to(device).train()
    hand = handwritten.build(name).to(device).train()
    handwritten.copy_from_caffe(hand, net, name)
    inputs = make_inputs(net, torch.Generator().manual_seed(1), device)
    loss_diff = check_agreement(name, net, hand, inputs)
    times = time_pair({
        "caffenet": (lambda: net.loss(net(inputs)), list(net.params)),
        "handwritten": (lambda: hand(inputs), list(hand.parameters())),
    }, warmup, iters, device, clock)
    c, h = times["caffenet"], times["handwritten"]
    caffe_ref = caffe.get((name, threads)) if device.type == "cpu" else None
    batch = next(iter(net.input_shapes().values()))[0]
    return {
        "net": name, "batch": batch, "threads": threads, "device": str(device), "warmup": warmup, "iters": iters,
        "loss_abs_diff": loss_diff, "caffenet": times["caffenet"], "handwritten": times["handwritten"],
        "ratio": c["total_ms"] / h["total_ms"],
        "paired_ratio": statistics.median(a / b for a, b in zip(c["total_samples_ms"], h["total_samples_ms"],
                                                                   strict=True)),
        "ratio_of_minima": c["total_min_ms"] / h["total_min_ms"],
        "forward_ratio": c["forward_ms"] / h["forward_ms"],
        "caffe": caffe_ref, "forward_flops": net_forward_flops(net),
        "gemm_peak_gflops": peak_gflops(threads) if device.type == "cpu" else gpu_peak_gflops(device),
    }


def bench_alexnet_build(repeats: int) -> dict:
    start = time.perf_counter()
    proto = filter_net(read_net(ALEXNET), net_state("TRAIN"))
    parse_s = time.perf_counter() - start
    builds = []
    for _ in range(repeats):
        start = time.perf_counter()
        net = CaffeNet(proto, {"data": (256, 3, 227, 227), "label": (256,)})
        builds.append(time.perf_counter() - start)
        del net
    return {"net": ALEXNET.name, "parse_filter_s": parse_s, "build_s": statistics.median(builds),
            "build_samples_s": builds}


def markdown(results: list[dict], build: dict | None, meta: dict) -> str:
    lines = [
        "# Converter speed: CaffeNet vs hand-written PyTorch",
        "",
        f"torch {meta['torch']}, {meta['device']}, {meta['threads']} thread(s) of {meta['cpus']} CPUs, "
        f"{meta['clock']}; `{' '.join(['benchmarks/bench_converter.py', meta['argv']]).strip()}`. "
        "Forward + `loss.backward()` per iteration, the two implementations interleaved; medians of the "
        "measured iterations after warm-up. "
        "The ratio is CaffeNet / hand-written (medians); the paired ratio is the median over iterations of "
        "the two adjacent timings' ratio, and the ratio of minima compares the least disturbed iterations: "
        f"both are steadier than the first when the machine is shared (load average at the start: "
        f"{meta['loadavg']}).",
        "",
        "| net | batch | iters | CaffeNet fwd ms | CaffeNet fwd+bwd ms | hand-written fwd ms "
        "| hand-written fwd+bwd ms | ratio fwd+bwd (goal ≤ 1.05) | paired ratio | ratio of minima | ratio fwd "
        "| BVLC Caffe fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, h, caffe_row = r["caffenet"], r["handwritten"], r["caffe"]
        verdict = "ok" if r["ratio"] <= GOAL_RATIO else "ABOVE GOAL"
        caffe_cell = f"{caffe_row['total_ms']:,.1f} ({r['threads']} thr)" if caffe_row else "–"
        lines.append(f"| {r['net']} | {r['batch']} | {r['iters']} | {c['forward_ms']:.1f} | {c['total_ms']:.1f} "
                     f"| {h['forward_ms']:.1f} | {h['total_ms']:.1f} | {r['ratio']:.3f} ({verdict}) "
                     f"| {r['paired_ratio']:.3f} | {r['ratio_of_minima']:.3f} | {r['forward_ratio']:.3f} "
                     f"| {caffe_cell} |")
    if build is not None:
        verdict = "ok" if build["build_s"] < GOAL_BUILD_S else "ABOVE GOAL"
        lines += ["", f"Building the AlexNet CaffeNet ({build['net']}, TRAIN, data 256x3x227x227): "
                      f"{build['build_s']:.3f} s median of {len(build['build_samples_s'])} (goal < 1 s: {verdict}); "
                      f"reading + filtering the prototxt {build['parse_filter_s'] * 1e3:.1f} ms."]
    lines += ["", "Loss and all weight gradients of the two agree within 1e-4 before timing "
                  "(largest loss difference: "
                  f"{max((r['loss_abs_diff'] for r in results), default=0.0):.2e})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (3 on the KITTI net)")
    parser.add_argument("--iters", type=int, help="measured iterations for every net (overrides the defaults)")
    parser.add_argument("--warmup", type=int, help="warm-up iterations (default 3, --quick 1)")
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated subset of " + ", ".join(NETS))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time instead of the wall clock (with --threads 1 "
                             "this ignores other processes on a shared machine)")
    parser.add_argument("--no-build", action="store_true", help="skip the AlexNet build timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for converter.md / converter.json")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    caffe = caffe_times()
    results = []
    for name in args.nets.split(","):
        iters = args.iters or ITERS[name][1 if args.quick else 0]
        print(f"timing {name}: {warmup} warm-up + {iters} iterations ...", file=sys.stderr, flush=True)
        results.append(bench_net(name, warmup, iters, args.threads, device, caffe, clock))
    build = None if args.no_build else bench_alexnet_build(1 if args.quick else 3)

    meta = {"torch": torch.__version__, "device": str(device), "threads": args.threads, "cpus": os.cpu_count(),
            "platform": platform.platform(), "quick": args.quick,
            "argv": " ".join(sys.argv[1:] if argv is None else argv),
            "clock": "process CPU time" if args.cpu_time else "wall clock",
            "loadavg": " ".join(f"{v:.2f}" for v in load)}
    text = markdown(results, build, meta)
    print(text, file=sys.stderr)
    figures = []
    for r in results:  # per net: CaffeNet fwd+bwd vs the hand-written module, Caffe, and the GEMM peak
        c = r["caffenet"]
        peak_ms = 3 * r["forward_flops"] / (r["gemm_peak_gflops"] * 1e9) * 1e3
        figures.append(figure(
            f"{r['net']} (batch {r['batch']}) forward+backward, {r['threads']} threads", c["total_samples_ms"], "ms",
            ref("hand-written PyTorch module", "measured", r["handwritten"]["total_ms"]),
            ref(f"BVLC Caffe, {r['threads']} threads", "caffe", (r["caffe"] or {}).get("total_ms")),
            ref(f"3x forward FLOPs at the GEMM peak ({r['gemm_peak_gflops']:.0f} GFLOP/s)", "measured", peak_ms),
            device=r["device"]))
    if build is not None:
        figures.append(figure("AlexNet CaffeNet build (TRAIN, 256x3x227x227)", build["build_samples_s"], "s",
                              ref("goal", "goal", GOAL_BUILD_S)))
    if args.out == RESULTS:
        emit("converter", figures, {"meta": meta, "nets": results, "alexnet_build": build}, text)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "converter.md").write_text(text)
        (args.out / "converter.json").write_text(json.dumps({"meta": meta, "nets": results, "alexnet_build": build,
                                                            "figures": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
