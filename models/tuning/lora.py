"""LoRA through the `peft` library: low-rank adapters on the linear layers named by `peft.lora_targets`.

The adapters are injected in place (the denoiser keeps its class, so the family's `predict` is unchanged); the
base weights are frozen. The merged export folds B A (alpha / r) into the base weights with peft's own
`merge_and_unload`, on a copy built on the meta device and filled with the given state, so that no second
model is materialised; the adapter alone is peft's `get_peft_model_state_dict`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, LoraModel, get_peft_model_state_dict, inject_adapter_in_model

ADAPTER = "default"


def matches(module_name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the full name, or its last components."""
    return any(module_name == t or module_name.endswith(f".{t}") for t in targets)


class LoRA:
    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: tuple[str, ...] = ("to_q", "to_k", "to_v")):
        self.targets = list(targets)
        self.config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=self.targets, lora_dropout=0.0)
        self.architecture: tuple[type, dict] | None = None  # the plain denoiser's class and config

    @classmethod
    def from_settings(cls, settings) -> LoRA:
        return cls(settings.lora_rank, settings.lora_alpha, tuple(settings.lora_targets))

    def apply(self, denoiser: torch.nn.Module) -> None:
        modules = denoiser.named_modules()
        linears = [n for n, m in modules if isinstance(m, torch.nn.Linear) and matches(n, self.targets)]
        if not linears:
            raise ValueError(
                f"LoRA: no linear layer of {type(denoiser).__name__} matches peft.lora_targets={self.targets}: "
                "name linear layers of this model (their names or last name components, e.g. to_q, to_out.0)"
            )
        if not hasattr(denoiser, "config"):
            raise ValueError(f"LoRA needs a diffusers model (with a config) to export merged, not {type(denoiser)}")
        self.architecture = (type(denoiser), dict(denoiser.config))
        denoiser.requires_grad_(False)
        inject_adapter_in_model(copy.deepcopy(self.config), denoiser, adapter_name=ADAPTER)  # adapters train

    def parameter_groups(self, denoiser: torch.nn.Module, lr: float) -> list[dict]:
        return [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": lr, "base_lr": lr}]

    def trainable_names(self, denoiser: torch.nn.Module) -> list[str]:
        return [name for name, param in denoiser.named_parameters() if param.requires_grad]

    def _skeleton(self) -> LoraModel:
        """The adapted architecture on the meta device (no memory, no initialisation)."""
        model_class, config = self.architecture
        with torch.device("meta"):
            model = model_class.from_config(config)
            return LoraModel(model, copy.deepcopy(self.config), ADAPTER, low_cpu_mem_usage=True)

    def merged_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tuner = self._skeleton()
        state = {k: v.float() for k, v in denoiser_state.items()}
        missing, unexpected = tuner.model.load_state_dict(state, strict=False, assign=True)
        if unexpected or [k for k in missing if not k.endswith("pos_embed")]:
            raise ValueError(f"LoRA: the state does not fit the adapted model: {(missing + unexpected)[:5]}")
        return {k: v for k, v in tuner.merge_and_unload().state_dict().items() if not v.is_meta}

    def adapter_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self._skeleton().model, state_dict=denoiser_state, adapter_name=ADAPTER)

    def write_adapter_config(self, directory: Path) -> None:
        """peft's adapter_config.json: `inject_adapter_in_model(LoraConfig.from_pretrained(directory), model)` and
        `set_peft_model_state_dict(model, safetensors.torch.load_file(directory / ADAPTER_WEIGHTS))` apply it."""
        self.config.save_pretrained(str(directory))
