"""Diff-Tuning's objective: the pre-trained model's own per-sample loss, split between two sources.

The timestep split lives in the sampler (t ~ psi for target slots, t ~ xi for bank slots), so the loss
itself is DiT's plain objective; `source_weights` turns per-sample losses into
`mean(target) + lambda * mean(bank)` over the *global* batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch


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

    TABLES = (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "log_betas", "posterior_mean_coef1",
        "posterior_mean_coef2",
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
) -> torch.Tensor:
    """Per-sample DiT loss: epsilon-MSE, plus the variational bound that trains a learned variance.

    `output` has C channels (epsilon only) or 2C (epsilon and the variance interpolation v in [-1, 1]).
    As in DiT, the bound sees a detached epsilon, so it trains only the variance; it is in bits per dim.
    """
    mse = _mean_per_sample((output[:, : x0.shape[1]] - noise) ** 2)
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
    """Per-slot weights: mean over the global target slots + lambda * mean over the global bank slots."""
    target_weight = 1.0 / num_target if num_target else 0.0
    bank_weight = bank_loss_weight / num_bank if num_bank else 0.0
    return torch.where(is_bank, bank_weight, target_weight).float()


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
