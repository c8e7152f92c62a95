"""The DDPM process of DiT and Stable Diffusion: integer timesteps t = 0..T-1 of a beta schedule, epsilon
prediction, and (for a 2C-channel output) DiT's learned variance trained through the variational bound.

Diff-Tuning splits the timesteps by psi(t) = (t/T)^tau for target slots and xi = 1 - psi for bank slots
(`data.sampler.TimestepSplit`), over DDPM's uniform training distribution of t.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data.sampler import TimestepSplit
from models.noise.settings import refuse_other_settings


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


class DDPMProcess:
    """A `NoiseProcess` over the discrete timesteps of `betas`; its levels are int64 timesteps."""

    name = "ddpm"
    continuous = False

    def __init__(self, betas: np.ndarray | torch.Tensor):
        self.schedule = NoiseSchedule(betas)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def split(self, method: object) -> TimestepSplit:
        """method.tau, timestep_weights, bank_tau; logsnr_center / logsnr_width (placed on this schedule's
        log-SNR) and bank_max_t, where set."""
        return TimestepSplit(
            self.num_timesteps, method.tau, method.timestep_weights, method.bank_tau,
            log_snr=tuple(self.schedule.snr.cpu().log().tolist()),
            logsnr_center=getattr(method, "logsnr_center", -2.5), logsnr_width=getattr(method, "logsnr_width", 1.0),
            bank_max_t=getattr(method, "bank_max_t", None),
        )  # fmt: skip

    def to(self, device: torch.device | str) -> DDPMProcess:
        self.schedule.to(device)
        return self

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, levels)

    def model_input(self, x_t: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, levels  # the network takes x_t and the integer t as they are

    def loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        levels: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return diffusion_loss(output, x0, x_t, noise, levels, self.schedule, mse_weights)

    def snr(self, levels: torch.Tensor) -> torch.Tensor:
        table = self.schedule.snr
        return (table if table.device == levels.device else table.to(levels.device))[levels]

    def level_bucket(self, levels: torch.Tensor, num_buckets: int) -> torch.Tensor:
        return levels * num_buckets // self.num_timesteps  # t is uniform in training: equal-width bands

    @classmethod
    def check_settings(cls, method: object, noise: object) -> None:
        refuse_other_settings(noise, "ddpm", "the discrete DDPM process (integer timesteps of its beta schedule)")
