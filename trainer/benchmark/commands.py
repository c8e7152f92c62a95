"""The benchmark entry point's jobs (launch/benchmark.py): measure a configuration side by side with fine-tuning and
a minimal loop, plan its memory on the meta device, or check a plan against a tracked training run."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from trainer.config import load_config

PLAN_MICRO_BATCH = {"dit-xl2": 64, "sd15-controlnet": 8, "flux-12b": 1, "sd35-large": 1}
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
    workdir = work_dir(args.workdir, load_config(args.config, args.overrides).run.dir)  # shared by the nodes
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
