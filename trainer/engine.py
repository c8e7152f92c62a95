"""The DeepSpeed engine, built from our config (ZeRO 0-3, fp32/bf16, accumulation, clipping, warm-up)."""

from __future__ import annotations

import logging

import deepspeed
import torch

from trainer.config import Config


def deepspeed_config(cfg: Config, accumulation_steps: int) -> dict:
    optim = cfg.optim
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: the same update on every accelerator, the CPU included.
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "gradient_clipping": optim.grad_clip,
        "steps_per_print": 2**31 - 1,  # our own logger reports
        "wall_clock_breakdown": False,
    }
    if optim.warmup_steps:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": optim.lr,
                "warmup_num_steps": optim.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return ds


def build_engine(cfg: Config, module: torch.nn.Module, parameters: list, accumulation_steps: int):
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=parameters, config=deepspeed_config(cfg, accumulation_steps)
    )
    return engine


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
