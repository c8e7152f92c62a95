"""The DeepSpeed engine, built from our config (ZeRO 0-3, fp32/bf16, accumulation, clipping)."""

from __future__ import annotations

import logging

import deepspeed
import torch

from trainer.config import Config
from trainer.optim import GuardedAdamW

# DeepSpeed's defaults keep a 5e8-element gradient bucket (1.9 GiB in fp32), under ZeRO-3 up to 1e9 gathered
# parameter elements alive from their forward to their backward (a whole DiT-XL/2 on every rank), and flatten a
# rank's whole gradient partition into a new fp32 tensor at the step (sub-groups of 1e9 elements). Bounded so
# that no rank holds all weights; trainer/benchmark/memory_plan.py counts these buffers (elements).
ZERO_BUFFERS = {
    "reduce_bucket_size": 50_000_000,
    "allgather_bucket_size": 50_000_000,  # ZeRO-1/2's gather of the updated partitions (default 5e8)
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 100_000_000,
    "stage3_max_reuse_distance": 50_000_000,
    "sub_group_size": 100_000_000,
}


def deepspeed_config(cfg: Config, accumulation_steps: int, load_universal: bool = False) -> dict:
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        # overlap_comm: buckets are reduced (ZeRO-2) or gathered (ZeRO-3) on a side stream while the backward
        # goes on; serial, a DiT-XL/2 step waits after its backward for its gradients (about 2.7 GB of bf16).
        "zero_optimization": {
            "stage": cfg.train.zero_stage,
            **ZERO_BUFFERS,
            "overlap_comm": cfg.train.overlap_comm and cfg.train.zero_stage >= 2,
        },
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (trainer/optim.py)
        # The skip decision is ours, on the device (trainer/optim.py): DeepSpeed's own check reads the host.
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": False},
        "gradient_clipping": cfg.optim.grad_clip,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # our own logger reports
        # DeepSpeed's throughput timer synchronises the device at every forward and step when enabled: our
        # logger measures throughput on the host, at its own log steps.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,  # per-phase timers, which synchronise too
    }


def build_engine(
    cfg: Config, module: torch.nn.Module, parameters: list, accumulation_steps: int, load_universal: bool,
    device: torch.device,
):  # fmt: skip
    """The engine and its (inner) optimizer, which takes the all-rank skip decision on the device and sets the LR."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optim = cfg.optim
    optimizer = GuardedAdamW(
        parameters, lr=optim.lr, warmup_steps=optim.warmup_steps, betas=tuple(optim.betas), eps=optim.eps,
        weight_decay=optim.weight_decay,
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, accumulation_steps, load_universal)
    )
    # Under ZeRO the gradients are partitioned, and DeepSpeed has the global norm (over every rank and
    # parameter group, a device tensor) before it calls our step: the skip decision reuses it.
    zero_norm = (lambda: getattr(engine.optimizer, "_global_grad_norm", None)) if cfg.train.zero_stage else None
    optimizer.attach(device, cfg.train.max_consecutive_skips, zero_norm)
    return engine, optimizer
