"""Which parameters of the denoiser train: all of them, or a parameter-efficient method (DiffFit, BitFit, LoRA).

A method changes the denoiser in place before DeepSpeed sees it (adds scale factors or adapters, freezes what
does not train), gives the optimizer its parameter groups, and turns a state dict of the tuned denoiser back
into the family's plain architecture (the merged export, which diffusers pipelines load) or into the adapter
alone. Adding a method is one module here and one entry in `TUNING_METHODS`; the loop does not change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name, so that LoRA adapters load with peft


@runtime_checkable
class TuningMethod(Protocol):
    name: str

    def apply(self, denoiser: torch.nn.Module) -> None:
        """Adds the method's modules and freezes what does not train; raises ValueError if it cannot apply."""

    def parameter_groups(self, denoiser: torch.nn.Module, lr: float) -> list[dict]:
        """Optimizer groups of the trainable parameters; each keeps its own `base_lr` for the LR schedule."""

    def trainable_names(self, denoiser: torch.nn.Module) -> list[str]:
        """Names of the parameters that train, as `denoiser.named_parameters()` gives them."""

    def merged_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of the plain architecture, with what the method added folded in."""

    def adapter_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter alone: what must be added to the frozen weights (empty for full fine-tuning)."""

    def write_adapter_config(self, directory: Path) -> None:
        """Writes beside the adapter what a reader needs to apply it."""


def _lazy(module: str, attribute: str) -> Callable[..., TuningMethod]:
    """Imports a method's module only when it is used (peft is not needed for the others)."""

    def build(settings) -> TuningMethod:
        import importlib

        return getattr(importlib.import_module(f"models.tuning.{module}"), attribute).from_settings(settings)

    return build


TUNING_METHODS: dict[str, Callable[..., TuningMethod]] = {
    "full": _lazy("full", "FullTuning"),
    "bitfit": _lazy("bitfit", "BitFit"),
    "difffit": _lazy("difffit", "DiffFit"),
    "lora": _lazy("lora", "LoRA"),
}


def tuning_method(name: str, settings) -> TuningMethod:
    """The method `name`, configured from `settings` (an object with the `peft:` config's fields)."""
    if name not in TUNING_METHODS:
        raise ValueError(f"method.peft={name!r} is not one of {tuple(TUNING_METHODS)}")
    return TUNING_METHODS[name](settings)


def describe(method: TuningMethod, denoiser: torch.nn.Module) -> str:
    """One line for the start of a run: how many tensors and elements train, of how many."""
    names = set(method.trainable_names(denoiser))
    params = dict(denoiser.named_parameters())
    tuned = sum(_numel(params[n]) for n in names)
    total = sum(_numel(p) for p in params.values())
    return (
        f"tunable set ({method.name}): {len(names)} of {len(params)} parameter tensors, "
        f"{tuned:,} of {total:,} elements ({100.0 * tuned / max(total, 1):.3f}%)"
    )


def save_adapter(
    method: TuningMethod, denoiser_state: dict[str, torch.Tensor], directory: Path
) -> dict[str, torch.Tensor]:
    """Writes the adapter alone (safetensors + its config) to `directory` and returns it; {} when there is none."""
    adapter = method.adapter_state_dict(denoiser_state)
    if not adapter:
        return {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, directory / ADAPTER_WEIGHTS)
    method.write_adapter_config(directory)
    return adapter


def write_tuning_config(directory: Path, config: dict) -> None:
    (Path(directory) / "tuning_config.json").write_text(json.dumps(config, indent=1))


# --- shared by the methods ---------------------------------------------------------------------------


def freeze_all_but(denoiser: torch.nn.Module, names: set[str]) -> None:
    for name, param in denoiser.named_parameters():
        param.requires_grad_(name in names)


def requires_grad_names(denoiser: torch.nn.Module) -> list[str]:
    return [name for name, param in denoiser.named_parameters() if param.requires_grad]


def single_group(denoiser: torch.nn.Module, lr: float) -> list[dict]:
    """One group of every trainable parameter at `lr` (`base_lr`: the LR schedule scales from it)."""
    return [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": lr, "base_lr": lr}]


def _numel(parameter: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when it was built partitioned (ZeRO-3 keeps the full count aside)."""
    return getattr(parameter, "ds_numel", parameter.numel())
