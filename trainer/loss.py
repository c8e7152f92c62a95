"""Diff-Tuning's objective: the pre-trained model's own per-sample loss, split between two sources.

The split of noise levels lives in the planner and the family's noise process (levels ~ psi for target slots,
~ xi for bank slots), so the per-sample loss itself is the process's plain objective (`models/noise/`);
`source_weights` turns per-sample losses into `mean(target) + lambda * mean(bank)` over the *global* batch.
`snr_loss_weights` optionally re-weights the regression term by each slot's SNR on top (Min-SNR-gamma, P2),
for both sources alike.
"""

from __future__ import annotations

from typing import Protocol

import torch

# DDPM's schedule and DiT's per-sample loss belong to the DDPM noise process; they are re-exported here, where
# the tools that train a plain DDPM model (the demo and digits assets, the throughput baseline) import them.
from models.noise.ddpm import NoiseSchedule, diffusion_loss

__all__ = ["NoiseSchedule", "diffusion_loss", "source_weights", "snr_loss_weights", "timestep_loss_weights"]
LOSS_WEIGHTINGS = ("none", "min_snr", "min_snr_released", "p2")  # method.loss_weighting


class LossWeighting(Protocol):
    """The settings of the regression weighting (the config's `method` section has them)."""

    loss_weighting: str
    min_snr_gamma: float
    p2_k: float
    p2_gamma: float


def source_weights(is_bank: torch.Tensor, num_target: int, num_bank: int, bank_loss_weight: float) -> torch.Tensor:
    """Per-slot weights: mean over the global target slots + lambda * mean over the global retention slots
    (`is_bank`: the plan's retention slots, bank samples or KD slots; lambda: the retention's `loss_weight`)."""
    target_weight = 1.0 / num_target if num_target else 0.0
    bank_weight = bank_loss_weight / num_bank if num_bank else 0.0
    return torch.where(is_bank, bank_weight, target_weight).float()


def snr_loss_weights(snr: torch.Tensor, method: LossWeighting) -> torch.Tensor:
    """Per-slot weights of the regression term, a pure function of each slot's SNR (the noise process's `snr`).

    none: 1. min_snr: Min-SNR-gamma for epsilon prediction, min(SNR, gamma) / SNR (Hang et al., 2023), which
    lowers the weight of the low-noise steps whose SNR exceeds gamma. min_snr_released: min(gamma, SNR), the weight
    the released Diff-Tuning code puts on its epsilon-MSE (the rebuttal's Min-SNR figures), which also takes the
    weight of the noisiest steps toward 0. p2: 1 / (k + SNR)^gamma (Choi et al., 2022), which lowers it smoothly as
    SNR grows. float32 on snr's device: device arithmetic only, no host read.
    """
    if method.loss_weighting == "none":
        return torch.ones(snr.shape, dtype=torch.float32, device=snr.device)
    if method.loss_weighting == "min_snr":
        return (snr.clamp(max=method.min_snr_gamma) / snr).float()
    if method.loss_weighting == "min_snr_released":
        return snr.clamp(max=method.min_snr_gamma).float()
    if method.loss_weighting == "p2":
        return (method.p2_k + snr).pow(-method.p2_gamma).float()
    raise ValueError(f"method.loss_weighting={method.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")


def timestep_loss_weights(t: torch.Tensor, schedule: NoiseSchedule, method: LossWeighting) -> torch.Tensor:
    """`snr_loss_weights` at DDPM timesteps t, with SNR(t) = abar / (1 - abar) of the schedule (float64: it spans
    ~1e-5 .. 1e4 over a DDPM schedule)."""
    if method.loss_weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    table = schedule.snr if schedule.snr.device == t.device else schedule.snr.to(t.device)
    return snr_loss_weights(table[t], method)
