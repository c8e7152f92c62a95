"""The reverse-process samplers a family offers, by the names `eval.sampler` takes: diffusers schedulers built from
the family's scheduler config (the first name of a family's `samplers` is its own, what its bank and previews use)."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

DDPM_SAMPLERS = ("ddim", "dpm++")  # discrete DDPM families: DDIM (eta 0), DPM-Solver++ (2nd order)
EDM_SAMPLERS = ("euler", "dpm++")  # continuous sigma (EDM): Euler over Karras' sigmas, DPM-Solver++ over the same


def ddpm_sampler(scheduler_config: dict, sampler: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    raise ValueError(f"sampler {sampler!r} is not one of {DDPM_SAMPLERS} (a DDPM family)")


def edm_sampler(scheduler_config: dict, sampler: str) -> EDMEulerScheduler | EDMDPMSolverMultistepScheduler:
    if sampler == "euler":
        return EDMEulerScheduler.from_config(scheduler_config)
    if sampler == "dpm++":
        return EDMDPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    raise ValueError(f"sampler {sampler!r} is not one of {EDM_SAMPLERS} (an EDM family)")


FLOW_SAMPLERS = ("euler", "dpm++")  # flow matching: Euler over the shifted flow times, DPM-Solver++ on flow sigmas


def flow_sampler(scheduler_config: dict, sampler: str) -> FlowMatchEulerDiscreteScheduler | DPMSolverMultistepScheduler:
    """`scheduler_config`: a FlowMatchEulerDiscreteScheduler config (num_train_timesteps, shift)."""
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000), algorithm_type="dpmsolver++",
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=scheduler_config.get("shift", 1.0),
        )  # fmt: skip
    raise ValueError(f"sampler {sampler!r} is not one of {FLOW_SAMPLERS} (a flow-matching family)")


def initial_sample(scheduler, noise: torch.Tensor) -> torch.Tensor:
    """The reverse chain's start: the noise scaled as the scheduler wants (flow schedulers start at the noise)."""
    return noise * getattr(scheduler, "init_noise_sigma", 1.0)


def scaled_input(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's input at a reverse step: x itself for DDIM and flow, EDM's c_in x."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)
