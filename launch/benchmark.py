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
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.config import load_config  # noqa: E402

PLAN_MICRO_BATCH = {"dit-xl2": 64, "sd15-controlnet": 8}
SMALL_DIT = dict(num_attention_heads=3, attention_head_dim=64, num_layers=4, in_channels=4, out_channels=8,
                 sample_size=16)  # fmt: skip


def small_dit_overrides(folder: Path) -> list[str]:
    """The CPU default: a small DiT and synthetic target and bank shards, made once in `folder`."""
    from tests.tiny import make_shards, make_tiny_dit

    if not (folder / "pretrained" / "transformer").is_dir():
        make_tiny_dit(folder / "pretrained", num_classes=4, **SMALL_DIT)
        make_shards(folder / "target", 512, shape=(4, 16, 16), per_shard=128)
        make_shards(folder / "bank", 512, shape=(4, 16, 16), num_classes=10, per_shard=128, seed=1)
    return [f"model.pretrained={folder / 'pretrained'}", "model.num_classes=4", f"data.target={folder / 'target'}",
            f"data.bank={folder / 'bank'}", "train.precision=fp32", "train.zero_stage=0"]  # fmt: skip


def with_defaults(args, workdir: Path) -> list[str]:
    if any(o.startswith("model.pretrained=") for o in args.overrides):
        return args.overrides
    from trainer import distributed

    rank, _, _ = distributed.init()
    if rank == 0:
        small_dit_overrides(workdir / "small_dit")
    distributed.barrier()
    return small_dit_overrides(workdir / "small_dit") + args.overrides


def plan(args) -> None:
    from trainer.benchmark.memory_plan import plan_table

    results = []
    for spec in args.model:
        micro_batch = args.micro_batch or PLAN_MICRO_BATCH.get(spec, 8)
        text, rows = plan_table(
            spec, world_size=args.world_size, zero_stages=args.zero, precision=args.precision,
            micro_batch_size=micro_batch, checkpointing=[False, True] if args.checkpointing == "both"
            else [args.checkpointing == "yes"], gpu_memory_gb=args.gpu_memory_gb,
        )  # fmt: skip
        print(text + "\n")
        results += rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


def measure(args) -> None:
    from trainer import distributed
    from trainer.benchmark.throughput import format_report, measure, work_dir

    distributed.init()
    workdir = work_dir(args.workdir)
    result = measure(
        args.config, with_defaults(args, workdir), steps=args.steps, log_every=args.log_every,
        warmup_intervals=args.warmup_intervals, rounds=args.rounds, peak_override=args.peak_tflops, workdir=workdir,
    )  # fmt: skip
    if result:
        print(format_report(result), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def check(args) -> int:
    from trainer.benchmark.memory_check import check_dit_xl2_zero3, check_small_model, tracked_training

    if args.track_train:  # a rank of --check_plan_xl2's launch
        tracked_training(load_config(args.config, args.overrides, ("model.pretrained", "data.target")))
        return 0
    if args.check_plan_xl2:
        text, ok = check_dit_xl2_zero3(workdir=args.workdir)
    else:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="difftune-check-"))
        overrides = with_defaults(args, workdir) + [
            f"run.dir={workdir / 'run'}", "train.global_batch_size=16", "train.micro_batch_size=8", "train.steps=3",
            "run.log_every=1", "run.sample_every=0", "run.export=false", "run.progress=false", *args.overrides,
        ]  # fmt: skip
        text, ok = check_small_model(load_config(args.config, overrides))
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text, flush=True)
    return 0 if ok else 1


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
    parser.add_argument("--model", nargs="+", default=list(PLAN_MICRO_BATCH), help="dit-xl2, sd15-controlnet, or "
                        "a local diffusers folder")  # fmt: skip
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--micro_batch", type=int, help="default: 64 for dit-xl2, 8 otherwise")
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
