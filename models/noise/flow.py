"""The rectified-flow (flow-matching) process of SD3 and Flux: continuous time t in (0, 1), x_t = (1 - t) x0 + t n,
and the network trained to predict the velocity n - x0.

The training distribution of t is the model's own: uniform or logit-normal (logit t ~ N(mean, std^2); SD3: 0, 1),
then shifted, t' = alpha t / (1 + (alpha - 1) t), which moves mass toward noise (SD3: alpha = 3; Flux: alpha from
the image's token count, `resolution_shift`). Diff-Tuning on flow time (`models/noise/cdf_split.py`):
psi(t) = CDF(t)^tau of that distribution (tau = 1: psi = CDF), xi = 1 - psi; t = 1 is pure noise, so psi rises
toward noise as the paper's psi(t) = t/T does. The network sees t * 1000, the timestep of diffusers' flow schedulers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit, logit, ndtr, ndtri

from models.noise.cdf_split import CDFSplit
from models.noise.settings import PROCESS_SETTINGS, refuse_other_settings, refuse_timestep_options

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers: timestep = 1000 t
T_DISTRIBUTIONS = ("logit_normal", "uniform")  # noise.t_distribution
# Flux's resolution-dependent shift: mu linear in the image's token count, from 0.5 at 256 tokens to 1.15 at 4096
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def resolution_shift(num_tokens: int) -> float:
    """Flux's shift alpha = exp(mu) for an image of `num_tokens` transformer tokens (diffusers' `calculate_shift`)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return math.exp(BASE_SHIFT + slope * (num_tokens - BASE_SEQ_LEN))


@dataclass(frozen=True)
class FlowTime:
    """The training distribution of flow time: logit-normal or uniform, then shifted by alpha."""

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def cdf(self, t: np.ndarray) -> np.ndarray:
        unshifted = t / (self.shift - (self.shift - 1.0) * t)  # inverse of the shift
        if self.kind == "uniform":
            return unshifted
        return ndtr((logit(unshifted) - self.mean) / self.std)

    def quantile(self, v: np.ndarray) -> np.ndarray:
        base = v if self.kind == "uniform" else expit(self.mean + self.std * ndtri(v))
        return self.shift * base / (1.0 + (self.shift - 1.0) * base)


class FlowMatchingProcess:
    """A `NoiseProcess` over continuous flow time; its levels are float64 t in (0, 1)."""

    name = "flow"
    continuous = True

    def __init__(self, t_distribution: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0):  # fmt: skip
        self.time = FlowTime(t_distribution, float(logit_mean), float(logit_std), float(shift))

    @classmethod
    def from_settings(cls, noise: object | None, defaults: dict | None = None) -> FlowMatchingProcess:
        """`defaults` (the model folder's record, SD3: logit-normal 0, 1 and shift 3), overridden by the `noise:`
        config's flow fields that are set (not None)."""
        chosen = dict(defaults or {})
        chosen.update(
            {key: getattr(noise, key) for key in PROCESS_SETTINGS["flow"] if getattr(noise, key, None) is not None}
        )
        return cls(**chosen)

    def settings(self) -> dict:
        """What `from_settings` takes back (the export's record)."""
        time = self.time
        return {"t_distribution": time.kind, "logit_mean": time.mean, "logit_std": time.std, "shift": time.shift}

    def split(self, method: object) -> CDFSplit:
        return CDFSplit(self.time, method.tau)

    def to(self, device: torch.device | str) -> FlowMatchingProcess:
        return self  # no tables

    @staticmethod
    def _shaped(levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return levels.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        t = self._shaped(levels, x0)
        return (1.0 - t) * x0 + t * noise

    def model_input(self, x_t: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, (levels * NUM_TRAIN_TIMESTEPS).float()

    def loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        levels: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean |v - (n - x0)|^2 per sample (unweighted, as SD3's and Flux's trainers); extra output channels take
        no part."""
        loss = ((output[:, : x0.shape[1]].float() - (noise - x0).float()) ** 2).flatten(1).mean(dim=1)
        return loss if mse_weights is None else loss * mse_weights

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - t v: the clean estimate of a velocity."""
        return x_t - self._shaped(levels, x_t) * output[:, : x_t.shape[1]]

    def snr(self, levels: torch.Tensor) -> torch.Tensor:
        t = levels.double()
        return ((1.0 - t) / t) ** 2

    def level_bucket(self, levels: torch.Tensor, num_buckets: int) -> torch.Tensor:
        t = levels.double()  # the CDF in torch, on the levels' device: the step reads nothing back
        unshifted = t / (self.time.shift - (self.time.shift - 1.0) * t)
        if self.time.kind == "uniform":
            quantile = unshifted
        else:
            quantile = torch.special.ndtr((torch.logit(unshifted) - self.time.mean) / self.time.std)
        return (quantile * num_buckets).long().clamp(0, num_buckets - 1)

    @classmethod
    def check_settings(cls, method: object, noise: object) -> None:
        refuse_other_settings(noise, "flow", "the flow-matching process (velocity over continuous time)")
        if getattr(method, "timestep_weights", "complement") != "complement":
            raise ValueError(
                f"method.timestep_weights={method.timestep_weights}: the mirrored and logsnr weights are defined on "
                "integer DDPM timesteps; on flow time Diff-Tuning uses psi = CDF(t)^tau of the model's training "
                "distribution and xi = 1 - psi: set method.timestep_weights=complement"
            )
        if getattr(method, "loss_weighting", "none") != "none":
            raise ValueError(
                f"method.loss_weighting={method.loss_weighting}: Min-SNR and P2 re-weight an epsilon objective; a flow "
                "model is trained on velocity with its own distribution of t (noise.t_distribution, noise.shift): "
                "set method.loss_weighting=none"
            )
        refuse_timestep_options(method)
        tau = getattr(method, "tau", 1.0)
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"method.tau={tau}: psi(t) = CDF(t)^tau needs tau >= 0 (the paper: 1)")
        kind = getattr(noise, "t_distribution", None)
        if kind is not None and kind not in T_DISTRIBUTIONS:
            raise ValueError(f"noise.t_distribution={kind!r} is not one of {T_DISTRIBUTIONS}")
        for key in ("logit_std", "shift"):
            value = getattr(noise, key, None)
            if value is not None and not value > 0:
                raise ValueError(f"noise.{key}={value} must be > 0 (SD3: logit_std 1.0, shift 3.0)")
