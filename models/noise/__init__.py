"""Noise processes: how a family's model is noised, what it is trained to predict, and its per-sample loss.

A process is owned by its family (`family.noise_process`). Its noise *levels* are what Diff-Tuning splits between
the sources: the planner gives every slot a uniform draw, the process's `split` maps it to a level (psi for target
slots, xi for bank slots, defined on the process's own levels), and the loop calls `add_noise`, `model_input` and
`loss` with those levels. DDPM (discrete t, epsilon and learned variance), EDM (continuous sigma) and flow
matching (continuous time, velocity) are the processes; adding one is one module here and one entry in
`NOISE_PROCESSES`: the loop does not change.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from data.sampler import NoiseLevels
from models.noise.ddpm import DDPMProcess
from models.noise.edm import EDMProcess
from models.noise.flow import FlowMatchingProcess


@runtime_checkable
class NoiseProcess(Protocol):
    name: str
    continuous: bool  # levels are reals (sigma), not integer timesteps

    def split(self, method: object) -> NoiseLevels:
        """Diff-Tuning's psi / xi on this process's levels, from the `method` config (tau, timestep_weights, ...)."""

    def to(self, device: torch.device | str) -> NoiseProcess:
        """Moves the process's tables to the device once, so that the step copies nothing."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """x_t: the clean samples noised to each slot's level."""

    def model_input(self, x_t: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network is called with: (its input, its timestep), e.g. preconditioned."""

    def loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        levels: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss of the network's raw `output` (float32), its regression term scaled by `mse_weights`."""

    def snr(self, levels: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t at each level (float64), for timestep re-weightings."""

    def level_bucket(self, levels: torch.Tensor, num_buckets: int) -> torch.Tensor:
        """Which of `num_buckets` equal-probability bands of the training distribution each level is in (int64):
        the per-level loss curves of the metrics."""

    @classmethod
    def check_settings(cls, method: object, noise: object) -> None:
        """Raises ValueError naming the config key when `method`/`noise` settings do not apply to this process."""


NOISE_PROCESSES: dict[str, type] = {"ddpm": DDPMProcess, "edm": EDMProcess, "flow": FlowMatchingProcess}


def noise_process_class(name: str) -> type:
    if name not in NOISE_PROCESSES:
        raise ValueError(f"unknown noise process {name!r}; known: {', '.join(NOISE_PROCESSES)}")
    return NOISE_PROCESSES[name]
