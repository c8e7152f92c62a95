"""The EDM process (Karras et al., 2022): continuous noise levels sigma, x_t = x0 + sigma * n, log-normal training
sigma (ln sigma ~ N(P_mean, P_std^2)), and the preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x;
c_noise) trained with the loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.

Diff-Tuning on continuous levels (`models/noise/cdf_split.py`): psi(sigma) = CDF(sigma)^tau with CDF the training
distribution's (tau = 1: the paper's psi = CDF), xi = 1 - psi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from models.noise.cdf_split import CDFSplit
from models.noise.settings import refuse_other_settings, refuse_timestep_options

# EDM's training settings (Table 1 of the paper, "ours")
P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training distribution of sigma: ln sigma ~ N(P_mean, P_std^2)."""

    p_mean: float
    p_std: float

    def cdf(self, sigma: np.ndarray) -> np.ndarray:
        return ndtr((np.log(sigma) - self.p_mean) / self.p_std)

    def quantile(self, v: np.ndarray) -> np.ndarray:
        return np.exp(self.p_mean + self.p_std * ndtri(v))


class EDMProcess:
    """A `NoiseProcess` over continuous sigma; its levels are float64 sigmas."""

    name = "edm"
    continuous = True

    def __init__(self, p_mean: float = P_MEAN, p_std: float = P_STD, sigma_data: float = SIGMA_DATA):
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    @classmethod
    def from_settings(cls, noise: object | None) -> EDMProcess:
        """EDM's defaults, overridden by the `noise:` config's fields that are set (not None)."""
        given = {key: getattr(noise, key, None) for key in ("p_mean", "p_std", "sigma_data")}
        return cls(**{key: value for key, value in given.items() if value is not None})

    def split(self, method: object) -> CDFSplit:
        return CDFSplit(LogNormalSigma(self.p_mean, self.p_std), method.tau)

    def to(self, device: torch.device | str) -> EDMProcess:
        return self  # no tables: the coefficients are computed from sigma

    def preconditioning(self, sigma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) of EDM, computed in float64 and shaped to broadcast against `like`."""
        sigma = sigma.double()
        total = sigma**2 + self.sigma_data**2
        c_skip, c_out, c_in = self.sigma_data**2 / total, sigma * self.sigma_data / total.sqrt(), 1.0 / total.sqrt()
        shape = (-1, *([1] * (like.dim() - 1)))
        c_noise = sigma.log() / 4
        return tuple(c.to(like.dtype).view(shape) for c in (c_skip, c_out, c_in)) + (c_noise.float(),)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (float64)."""
        sigma = sigma.double()
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return x0 + levels.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) * noise

    def model_input(self, x_t: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, c_in, c_noise = self.preconditioning(levels, x_t)
        return c_in * x_t, c_noise

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """D(x_t; sigma) = c_skip x_t + c_out F: the x0 estimate of the network's raw output F."""
        c_skip, c_out, _, _ = self.preconditioning(levels, x_t)
        return c_skip * x_t + c_out * output[:, : x_t.shape[1]]

    def loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        levels: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """lambda(sigma) * mean |D - x0|^2 per sample, computed as the equal mean |F - target|^2 with the target
        (x0 - c_skip x_t) / c_out (lambda c_out^2 = 1), which stays exact in float32 at small sigma. Extra output
        channels (DiT's learned variance) take no part."""
        c_skip, c_out, _, _ = self.preconditioning(levels, x0)
        target = (x0 - c_skip * x_t) / c_out
        loss = ((output[:, : x0.shape[1]] - target) ** 2).flatten(1).mean(dim=1)
        return loss if mse_weights is None else loss * mse_weights

    def snr(self, levels: torch.Tensor) -> torch.Tensor:
        return 1.0 / levels.double() ** 2  # x_t = x0 + sigma n: signal scale 1

    def level_bucket(self, levels: torch.Tensor, num_buckets: int) -> torch.Tensor:
        quantile = torch.special.ndtr((levels.double().log() - self.p_mean) / self.p_std)
        return (quantile * num_buckets).long().clamp(0, num_buckets - 1)

    @classmethod
    def check_settings(cls, method: object, noise: object) -> None:
        refuse_other_settings(noise, "edm", "the EDM process (continuous sigma)")
        if getattr(method, "timestep_weights", "complement") != "complement":
            raise ValueError(
                f"method.timestep_weights={method.timestep_weights}: the mirrored weights (t+1)^tau, (T-t)^tau' and "
                "the logsnr sigmoid are defined on integer timesteps; on continuous sigma Diff-Tuning uses "
                "psi = CDF(sigma)^tau and xi = 1 - psi: set method.timestep_weights=complement"
            )
        if getattr(method, "loss_weighting", "none") != "none":
            raise ValueError(
                f"method.loss_weighting={method.loss_weighting}: EDM's loss weight lambda(sigma) = "
                "(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 already weights each noise level, and Min-SNR / P2 "
                "are defined on a discrete epsilon objective: set method.loss_weighting=none"
            )
        refuse_timestep_options(method)
        tau = getattr(method, "tau", 1.0)
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"method.tau={tau}: psi(sigma) = CDF(sigma)^tau needs tau >= 0 (the paper: 1)")
        for key in ("p_std", "sigma_data"):
            value = getattr(noise, key, None)
            if value is not None and not value > 0:
                raise ValueError(f"noise.{key}={value} must be > 0 (EDM: p_std 1.2, sigma_data 0.5)")
