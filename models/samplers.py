"""The reverse-process samplers a family offers, by the names `eval.sampler` takes: diffusers schedulers built from
the family's scheduler config (the first name of a family's `samplers` is its own, what its bank and previews use)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
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
