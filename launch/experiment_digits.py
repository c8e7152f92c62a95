"""The digits experiment (`make experiment`): the paper's findings at CPU scale on scikit-learn's digits.

Transfers the shipped DiT (assets/digits, pre-trained on digits 0-4 by launch/make_digits_assets.py) to digits
5-9 with a new label space and 10 or 50 images per class: plain fine-tuning vs Diff-Tuning (the paper's and the
released code's settings), 3 seeds, two step counts; Fréchet distance and accuracy in a digit classifier's
features, the replacement curve, denoising error by noise level. Writes --out/results.json and --docs/results.md
with its plots. Every job is the project's own, called in this process (trainer/experiments/digits.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.digits import METHODS, Plan, merge_results, run_experiment  # noqa: E402
from trainer.experiments.report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits", help="the jobs' folder (shards, runs, samples)")
    parser.add_argument("--docs", default="docs", help="where results.md and its plots go")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="target images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 600], help="increasing step counts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value for every job")
    parser.add_argument("--workers", type=int, default=2, help="processes, one per target size (one per core)")
    args = parser.parse_args(argv)
    if sorted(set(args.steps)) != args.steps:
        parser.error(f"--steps {args.steps} must be increasing: one run is resumed from each count to the next")
    plan = Plan(Path(args.out).resolve(), args.sizes, args.seeds, args.steps, args.methods, args.overrides)
    started = time.perf_counter()
    if args.workers > 1 and len(plan.sizes) > 1:
        # Each size is an independent experiment; the shared parts (held-out shards, the seeded bank, the
        # pre-trained model's samples) are rebuilt identically in each process's folder.
        parts = [dataclasses.replace(plan, sizes=[n], out=plan.out / f"size_{n}") for n in plan.sizes]
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            results = merge_results(list(pool.map(run_experiment, parts)), plan)
    else:
        results = run_experiment(plan)
    results["seconds"]["wall"] = round(time.perf_counter() - started, 1)
    command = "python launch/experiment_digits.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {write_report(results, Path(args.docs), command.strip())}")


if __name__ == "__main__":
    main()
