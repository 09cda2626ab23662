"""Probe pipeline speed: ONNX Runtime feature extraction vs the PyTorch module, and probe training time.

The net is the KITTI BCNN tower (``prototxt/kitti/bcnn_deploy.prototxt``: AlexNet conv1-conv5 + pool5) with
seeded random weights, exported with the thesis's probe blobs (norm1, norm2, conv3, conv4, conv5) as
outputs. Both engines get the same float32 batches of real ImageNet sample images (decoded and transformed
once, outside the timed region), the same thread count, and are interleaved (alternating which goes
first, each after a 50 ms pause so that a pool still spinning from one run does not slow or speed the
next) so that drift of a shared machine hits both alike; medians are reported; ORT with spinning pool
threads (its own default) is timed beside the project's sleeping ones. The goal is ORT >= 1.5x the
module's images/s on the CPU. The probe pipeline end to end (``extract``: decoding alongside) is timed
with both settings too. A profile of both (ORT's node trace, torch's profiler) then splits each
batch into convolution time and the rest and sets the convolutions' GFLOP/s beside the GEMM peak measured in
the same run: the module's time over ORT's convolution time alone is the most ORT could gain. Then one
thesis probe per layer is trained on the extracted features (``--probe-iters`` iterations of batch 125,
8 classes) and its seconds per iteration are reported.

Writes ``benchmarks/results/probe.{md,json}`` (the table also to stderr) and prints one JSON line.

    .venv/bin/python benchmarks/bench_probe.py [--threads N] [--batch N] [--iters N] [--probe-iters N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter import caffe_pb2  # noqa: E402
from converter.io import filter_net, net_state, read_net  # noqa: E402
from converter.net import CaffeNet  # noqa: E402
from runner.deploy import deploy_net  # noqa: E402
from runner.export import export_model, rebatch  # noqa: E402
from runner.ort import ort_session  # noqa: E402
from runner.probe import ProbeConfig, train_probe  # noqa: E402
from runner.probe_data import ImageSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, figure, net_forward_flops, ref  # noqa: E402
from gemm_peak import peak_gflops  # noqa: E402

BCNN = ROOT / "prototxt" / "kitti" / "bcnn_deploy.prototxt"
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet_samples"
RESULTS = Path(__file__).resolve().parent / "results"
BLOBS = ["norm1", "norm2", "conv3", "conv4", "conv5"]
GOAL = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5, help="measured batches per engine")
    ap.add_argument("--probe-iters", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    proto = filter_net(read_net(BCNN), net_state("TEST"))
    plan = deploy_net(proto, BLOBS, {"data": (args.batch, 3, 227, 227)})
    net = CaffeNet(plan.proto, generator=torch.Generator().manual_seed(0)).eval()
    path = RESULTS / "bcnn_bench.onnx"
    RESULTS.mkdir(exist_ok=True)
    export_model(net, plan, path)
    session = ort_session(path, threads=args.threads)  # the project's: idle pool threads sleep
    spinning = ort_session(path, threads=args.threads, spinning=True)  # ORT's own default
    module = rebatch(net, plan, args.batch)

    refs = sorted(str(p) for p in (IMAGENET / "images").glob("*.JPEG"))[:args.batch]
    source = ImageSource(caffe_pb2.TransformationParameter(mean_value=[104, 117, 123]), (3, 227, 227))
    x = source.batch(refs)
    xt = torch.from_numpy(x)

    def run_ort():
        return session.run(BLOBS, {"data": x})

    def run_spinning():
        return spinning.run(BLOBS, {"data": x})

    def run_torch():
        with torch.no_grad():
            blobs = module({"data": xt})
            return [blobs[b] for b in BLOBS]

    times: dict[str, list[float]] = {"ort": [], "torch": [], "ort_spinning": []}
    engines = [("ort", run_ort), ("torch", run_torch), ("ort_spinning", run_spinning)]
    for _, f in engines:  # warm-up
        f()
    for i in range(args.iters):
        for name, f in engines[i % 3:] + engines[:i % 3]:  # each engine first in turn
            time.sleep(0.05)  # a spinning pool winds down first: it would slow whatever is timed next
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = ips["ort"] / ips["torch"]
    pipeline = pipeline_images_per_s(path, args.threads, source, sorted(str(p) for p in (IMAGENET / "images").glob(
        "*.JPEG")), args.batch)

    split = conv_split(path, args.threads, x, xt, module)
    conv_gflop = net_forward_flops(net) / len(x) * args.batch / 1e9
    peak = peak_gflops(args.threads, runs=3, n=2048)
    bound = split["torch"]["total"] / split["ort"]["conv"]

    features = dict(zip(BLOBS, (v.reshape(len(x), -1) for v in run_ort()), strict=True))
    labels = torch.arange(len(x)) % 8
    probe_s = {}
    for i, blob in enumerate(BLOBS):
        config = ProbeConfig.named("thesis", iters=args.probe_iters)
        t = time.perf_counter()
        train_probe(torch.from_numpy(features[blob]), labels, 8, config, 1000 if i >= 2 else 0, seed=0)
        probe_s[blob] = (time.perf_counter() - t) / args.probe_iters

    cpu = platform.processor() or platform.machine()
    lines = [f"### Probe pipeline on the CPU ({args.threads} threads, {cpu})", "",
             f"| engine | images/s (batch {args.batch}, median of {args.iters}) |", "|---|---|",
             f"| ONNX Runtime (CPUExecutionProvider), the project's session (idle pool threads sleep) | "
             f"{ips['ort']:.1f} |",
             f"| ONNX Runtime, idle pool threads spin (ORT's default) | {ips['ort_spinning']:.1f} |",
             f"| PyTorch module (CaffeNet) | {ips['torch']:.1f} |",
             f"| ratio, the project's session | {ratio:.2f}x (goal >= {GOAL}x: "
             f"{'met' if ratio >= GOAL else 'NOT met'}) |",
             f"| ratio, spinning threads | {ips['ort_spinning'] / ips['torch']:.2f}x |", "",
             "The probe pipeline end to end (`runner.probe.extract`: JPEG decoding and the transform in threads one "
             f"batch ahead of ORT; {pipeline['images']} images, batch {args.batch}): "
             f"{pipeline['sleep']:.1f} images/s with the project's session, {pipeline['spin']:.1f} with spinning "
             "threads.", "",
             "| probe (thesis definition, batch 125) | s / iteration |", "|---|---|"]
    lines += [f"| {blob} ({'MLP 1000' if i >= 2 else 'linear'}, {features[blob].shape[1]} features) | {s:.4f} |"
              for i, (blob, s) in enumerate(probe_s.items())]
    lines += ["", f"Where the time goes (profiled, ms per batch of {args.batch}; {conv_gflop:.1f} GFLOP of convolution "
              f"per batch; GEMM peak in this run {peak:.0f} GFLOP/s):", "",
              "| engine | convolutions | convolution GFLOP/s | everything else | total |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['conv']:.1f} | {conv_gflop / s['conv'] * 1e3:.0f} | {s['total'] - s['conv']:.1f} | "
              f"{s['total']:.1f} |" for name, s in split.items()]
    lines += ["", f"ORT with nothing but its convolutions would be {bound:.2f}x the module (the goal's ceiling here)."]
    text = "\n".join(lines) + "\n"
    print(text, file=sys.stderr)
    torch_ips = ips["torch"]
    figures = [figure(f"ONNX Runtime feature extraction, BCNN batch {args.batch}, {args.threads} threads",
                      [args.batch / t for t in times["ort"]], "images/s",
                      ref("the PyTorch module (CaffeNet), same run", "measured", torch_ips),
                      ref("goal: 1.5x the module", "goal", GOAL * torch_ips), higher_is_better=True,
                      note=f"ORT's convolutions alone take {split['ort']['conv']:.1f} ms of its "
                           f"{split['ort']['total']:.1f} ms per batch ({conv_gflop / split['ort']['conv'] * 1e3:.0f} "
                           f"GFLOP/s; GEMM peak {peak:.0f}); the module takes {split['torch']['total']:.1f} ms, "
                           f"so ORT could reach at most {bound:.2f}x"),
               figure(f"ONNX Runtime feature extraction, pool threads spinning (ORT's default), batch {args.batch}",
                      [args.batch / t for t in times["ort_spinning"]], "images/s",
                      ref("the PyTorch module (CaffeNet), same run", "measured", torch_ips), higher_is_better=True),
               figure(f"PyTorch module (CaffeNet) feature extraction, batch {args.batch}",
                      [args.batch / t for t in times["torch"]], "images/s", higher_is_better=True),
               figure("probe pipeline end to end (decoding alongside), the project's session",
                      [pipeline["sleep"]], "images/s",
                      ref("the same with spinning threads", "measured", pipeline["spin"]),
                      higher_is_better=True)]
    emit("probe", figures, {"threads": args.threads, "batch": args.batch, "images_per_s": ips, "ratio": ratio,
                            "probe_s_per_iter": probe_s, "profile_ms_per_batch": split, "pipeline": pipeline,
                            "conv_gflop_per_batch": conv_gflop, "gemm_peak_gflops": peak, "ort_ceiling": bound}, text)
    path.unlink()
    return 0


def pipeline_images_per_s(path: Path, threads: int, source, refs: list[str], batch: int) -> dict:
    """``extract`` end to end (decoding in its thread pool alongside ORT) with sleeping and spinning ORT
    threads, alternated twice; the better run of each."""
    from runner.probe import extract

    refs = (refs * 3)[:256]
    out: dict = {"images": len(refs), "sleep": 0.0, "spin": 0.0}
    sessions = {k: ort_session(path, threads=threads, spinning=k == "spin") for k in ("sleep", "spin")}
    for session in sessions.values():
        extract(session, BLOBS, source, refs[:2 * batch], batch=batch)  # warm-up
    for _ in range(2):
        for name, session in sessions.items():
            t = time.perf_counter()
            extract(session, BLOBS, source, refs, batch=batch)
            out[name] = max(out[name], len(refs) / (time.perf_counter() - t))
    return out


def conv_split(path: Path, threads: int, x, xt: torch.Tensor, module, runs: int = 3) -> dict[str, dict[str, float]]:
    """ms per batch in convolutions and in total, for ORT (its node trace: Conv nodes, fused or not, against
    all nodes) and the module (torch's profiler: the convolution kernels against all self time)."""
    from torch.profiler import profile

    session = ort_session(path, threads=threads, profile_prefix=str(RESULTS / "bcnn_ort_profile"))
    for _ in range(runs + 1):
        session.run(BLOBS, {"data": x})
    trace = Path(session.end_profiling())
    nodes = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node"
             and e["name"].endswith("_kernel_time")]
    trace.unlink()
    per_run = 1e-3 / (runs + 1)  # us -> ms, warm-up included in the trace: averaged over every run
    ort_ms = {"conv": sum(e["dur"] for e in nodes if e["args"].get("op_name") == "Conv") * per_run,
              "total": sum(e["dur"] for e in nodes) * per_run}
    with torch.no_grad():
        module({"data": xt})
        with profile() as prof:
            for _ in range(runs):
                module({"data": xt})
    events = prof.key_averages()
    conv_us = sum(e.self_cpu_time_total for e in events if "convolution" in e.key and e.key.startswith("aten::mkldnn")
                  or e.key in ("aten::_convolution_cpu", "aten::slow_conv2d_forward", "aten::thnn_conv2d"))
    torch_ms = {"conv": conv_us / 1e3 / runs, "total": sum(e.self_cpu_time_total for e in events) / 1e3 / runs}
    return {"ort": ort_ms, "torch": torch_ms}


if __name__ == "__main__":
    sys.exit(main())
