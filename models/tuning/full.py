"""Full fine-tuning: every parameter the family leaves trainable trains (the default)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.tuning import requires_grad_names, single_group


class FullTuning:
    name = "full"

    @classmethod
    def from_settings(cls, settings) -> FullTuning:
        return cls()

    def apply(self, denoiser: torch.nn.Module) -> None:
        pass  # the family decides what trains (e.g. only the ControlNet of SD)

    def parameter_groups(self, denoiser: torch.nn.Module, lr: float) -> list[dict]:
        return single_group(denoiser, lr)

    def trainable_names(self, denoiser: torch.nn.Module) -> list[str]:
        return requires_grad_names(denoiser)

    def merged_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return denoiser_state

    def adapter_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}  # the export is the whole model

    def write_adapter_config(self, directory: Path) -> None:
        pass  # no adapter
