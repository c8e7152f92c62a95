"""The memory plan against a measurement: the real trainer's peak of live tensor bytes, per rank.

`tracked_training` runs `trainer.loop.train` (what `launch/train.py` runs) under `LiveTensorMemory` and writes
each rank's peak to `run.dir/memory_rank{r}.json`; `compare` puts it next to `plan_memory` of the same model,
world size, ZeRO stage, precision and micro-batch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from trainer import distributed
from trainer.benchmark.memory_plan import DIT_XL2, MemoryPlan, build_plan_model, plan_memory
from trainer.benchmark.memory_tracker import LiveTensorMemory
from trainer.config import Config, gradient_accumulation_steps, load_config, micro_batch_size
from trainer.loop import train

ROOT = Path(__file__).resolve().parents[2]


def tracked_training(cfg: Config) -> int:
    """Trains under the tracker; returns this rank's peak of live tensor bytes and writes it, with the process's
    peak resident memory, to run.dir."""
    rank, world_size, device = distributed.init()
    tracker = LiveTensorMemory(device.type)
    with tracker:
        train(cfg, overwrite=True)
    record = {"rank": rank, "peak_bytes": tracker.peak, "peak_rss_bytes": peak_rss_bytes()}
    Path(cfg.run.dir, f"memory_rank{rank}.json").write_text(json.dumps(record))
    return tracker.peak


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark (Linux), Python and the allocator's cache included."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    lines = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    return int(lines[0].split()[1]) * 1024 if lines else None


def plan_for(cfg: Config, world_size: int) -> MemoryPlan:
    return plan_memory(
        build_plan_model(cfg.model.pretrained), world_size=world_size, zero_stage=cfg.train.zero_stage,
        precision=cfg.train.precision, micro_batch_size=micro_batch_size(cfg, world_size),
        checkpointing=cfg.train.activation_checkpointing,
    )  # fmt: skip


def compare(
    plan: MemoryPlan, measured_bytes: list[int], tolerance: float = 0.10, rss_bytes: list[int | None] | None = None
) -> tuple[str, bool]:
    """A printed comparison and whether every rank is within `tolerance` of the plan's total."""
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in vars(plan).items())
    lines = [f"plan per rank (MiB): {parts}; total {plan.total / 2**20:.1f}"]
    ok = True
    for rank, measured in enumerate(measured_bytes):
        ratio = measured / plan.total
        ok &= abs(ratio - 1) <= tolerance
        rss = rss_bytes[rank] if rss_bytes else None
        process = f" (process peak RSS {rss / 2**20:.0f} MiB)" if rss else ""
        lines.append(f"rank {rank}: measured peak {measured / 2**20:.1f} MiB = {ratio:.3f} x plan{process}")
    verdict = "within" if ok else "NOT within"
    lines.append(f"measured peak of live tensors {verdict} {tolerance:.0%} of the plan")
    return "\n".join(lines), ok


def check_small_model(cfg: Config) -> tuple[str, bool]:
    """One process: the tracked trainer against the plan (gradient accumulation > 1 keeps gradients and the next
    micro-batch's activations alive together, which is what the plan's total counts)."""
    _, world_size, _ = distributed.init()
    if gradient_accumulation_steps(cfg, world_size) < 2:
        raise ValueError("--check_plan needs train.global_batch_size >= 2 x ranks x train.micro_batch_size")
    peak = tracked_training(cfg)
    return compare(plan_for(cfg, world_size), [peak])


def make_random_dit_xl2(folder: Path) -> Path:
    """A random DiT-XL/2 (the real architecture, ~3 GB of fp32 weights) saved as a diffusers folder."""
    torch.manual_seed(0)
    DiTTransformer2DModel(**DIT_XL2).save_pretrained(folder / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        folder / "scheduler"
    )
    return folder


def check_dit_xl2_zero3(
    num_ranks: int = 2, steps: int = 2, workdir: str | None = None, precision: str = "bf16"
) -> tuple[str, bool]:
    """Trains a random DiT-XL/2 at micro-batch 1 on `num_ranks` CPU ranks under ZeRO-3, each rank tracked, and
    compares every rank's peak with the plan. Needs ~3 GB of disk for the weights, ~12 GB for the final checkpoint,
    and per rank the plan's total plus ~0.6 GiB of RSS (bf16: 8.4 GiB measured; fp32: ~10.4 GiB)."""
    root = Path(workdir or tempfile.mkdtemp(prefix="difftune-xl2-"))
    try:
        pretrained = root / "dit_xl2"
        if not (pretrained / "transformer" / "config.json").is_file():
            make_random_dit_xl2(pretrained)
        plan, measured, rss = tracked_ranks(
            pretrained, root, num_ranks=num_ranks, steps=steps, zero_stage=3, precision=precision
        )
        text, ok = compare(plan, measured, rss_bytes=rss)
        return f"random DiT-XL/2, {num_ranks} CPU ranks, ZeRO-3, {precision}, micro-batch 1, {steps} steps\n{text}", ok
    finally:
        if workdir is None:  # ~3 GB of random weights
            shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tracked_ranks(pretrained: Path, root: Path, *, num_ranks: int, steps: int, zero_stage: int,
                  micro_batch_size: int = 1, precision: str = "fp32",
                  ) -> tuple[MemoryPlan, list[int], list[int | None]]:  # fmt: skip
    """Launches `deepspeed --num_gpus N launch/benchmark.py --track_train` on a DiT folder with synthetic data;
    returns the plan, every rank's tracked peak of live tensors and every rank's peak RSS."""
    from tests.tiny import make_shards  # the benchmark's synthetic data; imported only in this mode

    config = DiTTransformer2DModel.load_config(pretrained / "transformer")
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    target = make_shards(root / "target", 16, shape=shape, num_classes=2, per_shard=8)
    bank = make_shards(root / "bank", 16, shape=shape, num_classes=2, per_shard=8, seed=1)
    run_dir = root / "run"
    overrides = [
        f"model.pretrained={pretrained}", "model.num_classes=0", f"data.target={target}", f"data.bank={bank}",
        f"run.dir={run_dir}", f"train.steps={steps}", f"train.zero_stage={zero_stage}", f"train.precision={precision}",
        f"train.global_batch_size={num_ranks * micro_batch_size}", f"train.micro_batch_size={micro_batch_size}",
        "data.verify=size", "run.log_every=1", "run.sample_every=0", "run.export=false", "run.progress=false",
        # One reader thread: each decoding worker process would add its own interpreter and torch to the RSS.
        "data.num_workers=0",
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]  # this interpreter: its build of the ops
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # glibc raises its mmap threshold as large blocks are freed, then keeps ZeRO-3's freed gathered
           # parameters in its heaps (+0.5 GB RSS per rank on a 4-block XL/2); a fixed threshold returns them.
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}  # fmt: skip
    # A free port: DeepSpeed names its CPU all-reduce shared memory after it, and another job on the default port
    # would share (or hold) that name.
    command = [*launcher, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
               str(ROOT / "launch" / "benchmark.py"), "--track_train", "--config", "dit_xl2_paper",
               *overrides]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the tracked training run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads((run_dir / f"memory_rank{r}.json").read_text()) for r in range(num_ranks)]
    plan = plan_for(load_config("dit_xl2_paper", overrides), num_ranks)
    return plan, [r["peak_bytes"] for r in records], [r.get("peak_rss_bytes") for r in records]
