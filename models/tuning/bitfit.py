"""BitFit: only the bias terms train (Ben Zaken et al., 2022)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.tuning import freeze_all_but, requires_grad_names, single_group, write_tuning_config


def bias_names(denoiser: torch.nn.Module) -> list[str]:
    return [name for name, _ in denoiser.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]


class BitFit:
    name = "bitfit"

    def __init__(self) -> None:
        self.names: list[str] = []

    @classmethod
    def from_settings(cls, settings) -> BitFit:
        return cls()

    def apply(self, denoiser: torch.nn.Module) -> None:
        self.names = bias_names(denoiser)
        if not self.names:
            raise ValueError(
                f"BitFit tunes bias terms, and {type(denoiser).__name__} has none: choose method.peft=lora or full"
            )
        freeze_all_but(denoiser, set(self.names))

    def parameter_groups(self, denoiser: torch.nn.Module, lr: float) -> list[dict]:
        return single_group(denoiser, lr)

    def trainable_names(self, denoiser: torch.nn.Module) -> list[str]:
        return requires_grad_names(denoiser)

    def merged_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return denoiser_state  # nothing was added to the architecture

    def adapter_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: denoiser_state[name] for name in self.names}

    def write_adapter_config(self, directory: Path) -> None:
        note = "the biases of the plain model: load it, then load_state_dict(adapter, strict=False)"
        write_tuning_config(directory, {"method": self.name, "note": note})
