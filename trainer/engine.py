"""The DeepSpeed engine, built from our config (ZeRO 0-3, fp32/bf16, accumulation, clipping)."""

from __future__ import annotations

import logging

import deepspeed
import torch

from trainer.config import Config
from trainer.optim import GuardedAdamW


def deepspeed_config(cfg: Config, accumulation_steps: int, load_universal: bool = False) -> dict:
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (trainer/optim.py)
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "gradient_clipping": cfg.optim.grad_clip,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # our own logger reports
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, module: torch.nn.Module, parameters: list, accumulation_steps: int, load_universal: bool):
    """The engine and its (inner) optimizer, which takes the all-rank skip decision and sets the LR."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optim = cfg.optim
    optimizer = GuardedAdamW(
        parameters, lr=optim.lr, warmup_steps=optim.warmup_steps, betas=tuple(optim.betas), eps=optim.eps,
        weight_decay=optim.weight_decay,
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, accumulation_steps, load_universal)
    )
    return engine, optimizer


def gradient_norm(engine, parameters: list) -> float | None:
    """The global gradient norm, read before the boundary `engine.step()`.

    Without ZeRO (fp32) the gradients are whole and already averaged over ranks at the accumulation
    boundary, so the norm is local arithmetic. ZeRO and bf16 optimizers compute it themselves during the
    step: this returns None and `engine.get_global_grad_norm()` has it after the step.
    """
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
