"""``python -m runner.experiments train|eval EXPERIMENT [--scale S] [--jobs N] [--gpu G]`` (``make train EXP=…``).

EXPERIMENT is a folder of ``prototxt/`` (``mnist``, ``kitti``, ``transfer``, or a copy of one) or a path to
a folder holding an experiment.prototxt. See runner/experiments/engine.py for the run-folder layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from converter.errors import CaffeError
from runner.distributed import parse_gpus
from runner.experiments import engine
from runner.experiments.spec import load
from runner.netsetup import cuda_device
from runner.threads import usable_cpus


def main(argv: list[str] | None = None) -> int:
    # as the CLI: OpenCV's own warnings (an unreadable image) stay quiet, the run reports the failure itself;
    # set before OpenCV loads, here and in every job process (they inherit the environment)
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    parser = argparse.ArgumentParser(prog="python -m runner.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "eval"])
    parser.add_argument("experiment", help="a folder of prototxt/ (mnist, kitti, transfer, …) or a path")
    parser.add_argument("--scale", default=None, help="a scale the experiment defines (default: its default_scale)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="trainings run side by side (default: usable CPUs / --threads; with --gpu, one "
                        "per GPU, each job on a GPU of its own); "
                        "never changes a number")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each training (default 1); the last bits of a run depend on it")
    parser.add_argument("--gpu", default=None, help="train and probe on GPUs (0, 0,1, all): one job per GPU at a time")
    parser.add_argument("--runs", default="runs", help="runs go to RUNS/<experiment>/<scale>/")
    parser.add_argument("--data", default="data", help="data go to DATA/<experiment>/<scale>/")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 0 or args.threads < 1:
            raise CaffeError(f"--jobs must be 0 (automatic) or more and --threads 1 or more, "
                             f"got --jobs {args.jobs} --threads {args.threads}")
        gpus = len(parse_gpus(args.gpu))
        if gpus:
            cuda_device(args.gpu)  # no CUDA, or no such device: one line now, not in every job
        jobs = args.jobs or (gpus if gpus else max(1, usable_cpus() // args.threads))
        exp = load(args.experiment, args.scale)
        place = engine.Place.of(exp, args.runs, args.data)
        engine.say(f"{exp.name} at scale {exp.scale}: runs in {place.runs}, data in {place.data}; "
                   f"{jobs} job(s) side by side, {args.threads} thread(s) each")
        for line in exp.overrides:
            engine.say(f"scale {exp.scale}: {line}")
        start = time.perf_counter()
        if args.stage == "train":
            engine.train_stage(exp, place, jobs, args.threads, args.gpu)
        else:
            engine.eval_stage(exp, place, jobs, args.threads, args.gpu)
        engine.say(f"{args.stage}: done in {time.perf_counter() - start:.0f} s")
    except CaffeError as e:
        print(f"{args.experiment} experiment: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
