"""``python -m runner.experiments train|eval EXPERIMENT [--scale S] [--jobs N] [--gpu G]`` (``make train EXP=…``).

EXPERIMENT is a folder of ``prototxt/`` (``mnist``, ``kitti``, ``transfer``, or a copy of one) or a path to
a folder holding an experiment.prototxt. See runner/experiments/engine.py for the run-folder layout.
"""

from __future__ import annotations

import argparse
import sys
import time

from converter.errors import CaffeError
from runner.experiments import engine
from runner.experiments.spec import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "eval"])
    parser.add_argument("experiment", help="a folder of prototxt/ (mnist, kitti, transfer, …) or a path")
    parser.add_argument("--scale", default=None, help="a scale the experiment defines (default: its default_scale)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run side by side, each on cpus/jobs threads")
    parser.add_argument("--gpu", default=None, help="train on GPUs as `egomotion train --gpu` (0, 0,1, all)")
    parser.add_argument("--runs", default="runs", help="runs go to RUNS/<experiment>/<scale>/")
    parser.add_argument("--data", default="data", help="data go to DATA/<experiment>/<scale>/")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(engine.usable_cpus())
    try:
        if args.jobs < 1:
            raise CaffeError(f"--jobs must be at least 1, got {args.jobs}")
        exp = load(args.experiment, args.scale)
        place = engine.Place.of(exp, args.runs, args.data)
        engine.say(f"{exp.name} at scale {exp.scale}: runs in {place.runs}, data in {place.data}")
        for line in exp.overrides:
            engine.say(f"scale {exp.scale}: {line}")
        start = time.perf_counter()
        if args.stage == "train":
            engine.train_stage(exp, place, args.jobs, args.gpu)
        else:
            engine.eval_stage(exp, place, args.jobs, args.gpu)
        engine.say(f"{args.stage}: done in {time.perf_counter() - start:.0f} s")
    except CaffeError as e:
        print(f"{args.experiment} experiment: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
