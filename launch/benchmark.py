"""Benchmark a training configuration, or plan its memory.

`deepspeed launch/benchmark.py --config X key=value ... [--out result.json]` (or `python launch/benchmark.py`,
one process): images/s per GPU, TFLOP/s and MFU, peak memory, data-wait share, host reads per step, and the
step-time ratios Diff-Tuning / fine-tuning, KD retention / Diff-Tuning (bank) and trainer / minimal PyTorch loop,
measured side by side. Without
model.pretrained it builds a small DiT (4 blocks, 192 wide, 16x16x4 latents) and synthetic shards.

`--plan`: per-GPU memory on the meta device, e.g. `--plan --model dit-xl2 --world_size 8 --zero 2 3
--micro_batch 64 --gpu_memory_gb 80`. `--check_plan`: the plan against the tracked peak of a real training
run of the small DiT on the CPU. `--check_plan_xl2`: the same for a random DiT-XL/2 on 2 CPU ranks, ZeRO-3, bf16
(a peak RSS of 8.4 GiB per rank, 3 GB of disk for the weights and 12 GB for the final checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.benchmark.commands import PLAN_MICRO_BATCH, check, measure, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="dit_xl2_paper", help="a preset name from configs/ or a YAML file")
    parser.add_argument("--out", help="write the figures as JSON to this file")
    parser.add_argument("--workdir", help="folder for the runs and synthetic data (shared by all nodes)")
    parser.add_argument("--steps", type=int, default=30, help="steps per benchmarked run")
    parser.add_argument("--log_every", type=int, default=5, help="steps per timed interval (the trainer logs each)")
    parser.add_argument("--warmup_intervals", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three variants")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense peak, if it is not in the table")
    parser.add_argument("--plan", action="store_true", help="print per-GPU memory plans; no training")
    parser.add_argument("--model", nargs="+", default=list(PLAN_MICRO_BATCH),
                        help="dit-xl2, sd15-controlnet, flux-12b, sd35-large, or a local diffusers folder")  # fmt: skip
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--micro_batch", type=int, help="default: dit-xl2 64, flux/sd35 1, else 8")
    parser.add_argument("--checkpointing", default="both", choices=["both", "yes", "no"])
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0)
    parser.add_argument("--check_plan", action="store_true", help="plan vs tracked peak, small DiT, CPU")
    parser.add_argument("--check_plan_xl2", action="store_true", help="plan vs tracked peak, DiT-XL/2, 2 CPU ranks")
    parser.add_argument("--track_train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.micro_batch_size=16")
    args = parser.parse_args(argv)
    if args.plan:
        return run_guarded(lambda: plan(args))
    if args.check_plan or args.check_plan_xl2 or args.track_train:
        status = [0]
        guarded = run_guarded(lambda: status.__setitem__(0, check(args)))
        return guarded or status[0]
    return run_guarded(lambda: measure(args))


if __name__ == "__main__":
    exit_process(main())
