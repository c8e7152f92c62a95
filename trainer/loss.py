"""Diff-Tuning's objective: the pre-trained model's own per-sample loss, split between two sources.

The timestep split lives in the sampler (t ~ psi for target slots, t ~ xi for bank slots), so the loss
itself is DiT's plain objective; `source_weights` turns per-sample losses into
`mean(target) + lambda * mean(bank)` over the *global* batch. `timestep_loss_weights` optionally re-weights
the epsilon-MSE by the SNR of each slot's t on top (Min-SNR-gamma, P2), for both sources alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from trainer.config import MethodConfig

LOSS_WEIGHTINGS = ("none", "min_snr", "p2")  # method.loss_weighting


class NoiseSchedule:
    """The discrete DDPM quantities of the pre-trained schedule (float64, gathered per timestep)."""

    def __init__(self, betas: np.ndarray | torch.Tensor):
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.num_timesteps = len(betas)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value, as DiT does.
        self.posterior_log_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        self.log_betas = betas.log()
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)  # signal-to-noise ratio of x_t

    TABLES = (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "log_betas", "posterior_mean_coef1",
        "posterior_mean_coef2", "snr",
    )  # fmt: skip

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Moves the tables to the device once, so that lookups in the step copy nothing."""
        for name in self.TABLES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`name`[t] shaped to broadcast against `like` (one value per sample)."""
        table = getattr(self, name)
        values = (table if table.device == t.device else table.to(t.device))[t].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_alphas_cumprod", t, x0) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise


def diffusion_loss(
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    mse_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample DiT loss: epsilon-MSE, plus the variational bound that trains a learned variance.

    `output` has C channels (epsilon only) or 2C (epsilon and the variance interpolation v in [-1, 1]).
    As in DiT, the bound sees a detached epsilon, so it trains only the variance; it is in bits per dim.
    `mse_weights` (one per sample, e.g. `timestep_loss_weights`) scale the epsilon-MSE only: the timestep
    re-weightings are defined on the denoising (epsilon) objective, and the bound, which cannot move epsilon,
    keeps the unit weight it has in DiT's own objective, so the variance is learned as by the pre-trained model.
    """
    mse = _mean_per_sample((output[:, : x0.shape[1]] - noise) ** 2)
    if mse_weights is not None:
        mse = mse * mse_weights
    if output.shape[1] == x0.shape[1]:
        return mse
    eps, v = output.detach()[:, : x0.shape[1]], output[:, x0.shape[1] :]
    min_log = schedule.at("posterior_log_variance_clipped", t, x0)
    model_log_variance = (v + 1) / 2 * schedule.at("log_betas", t, x0) + (1 - v) / 2 * min_log
    x0_pred = (
        schedule.at("sqrt_recip_alphas_cumprod", t, x0) * x_t - schedule.at("sqrt_recipm1_alphas_cumprod", t, x0) * eps
    )
    coef1, coef2 = schedule.at("posterior_mean_coef1", t, x0), schedule.at("posterior_mean_coef2", t, x0)
    model_mean, true_mean = coef1 * x0_pred + coef2 * x_t, coef1 * x0 + coef2 * x_t
    kl = _normal_kl(true_mean, min_log, model_mean, model_log_variance)
    decoder_nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    vb = torch.where(t == 0, _mean_per_sample(decoder_nll), _mean_per_sample(kl)) / math.log(2.0)
    return mse + vb


def source_weights(is_bank: torch.Tensor, num_target: int, num_bank: int, bank_loss_weight: float) -> torch.Tensor:
    """Per-slot weights: mean over the global target slots + lambda * mean over the global retention slots
    (`is_bank`: the plan's retention slots, bank samples or KD slots; lambda: the retention's `loss_weight`)."""
    target_weight = 1.0 / num_target if num_target else 0.0
    bank_weight = bank_loss_weight / num_bank if num_bank else 0.0
    return torch.where(is_bank, bank_weight, target_weight).float()


def timestep_loss_weights(t: torch.Tensor, schedule: NoiseSchedule, method: MethodConfig) -> torch.Tensor:
    """Per-slot weights of the epsilon-MSE, a pure function of t and the schedule's SNR(t) = abar / (1 - abar).

    none: 1. min_snr: Min-SNR-gamma for epsilon prediction, min(SNR, gamma) / SNR (Hang et al., 2023), which
    lowers the weight of the low-noise steps whose SNR exceeds gamma. p2: 1 / (k + SNR)^gamma (Choi et al.,
    2022), which lowers it smoothly as SNR grows. float32 on t's device: device arithmetic only, no host read.
    """
    if method.loss_weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    table = schedule.snr if schedule.snr.device == t.device else schedule.snr.to(t.device)
    snr = table[t]  # float64: the SNR spans ~1e-5 .. 1e4 over a DDPM schedule
    if method.loss_weighting == "min_snr":
        return (snr.clamp(max=method.min_snr_gamma) / snr).float()
    if method.loss_weighting == "p2":
        return (method.p2_k + snr).pow(-method.p2_gamma).float()
    raise ValueError(f"method.loss_weighting={method.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised into 256 bins (the t = 0 decoder term)."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255))
    cdf_min = _approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
