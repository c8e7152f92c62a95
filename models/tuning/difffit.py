"""DiffFit (Xie et al., 2023): biases, normalization layers, the class embedding and new scale factors train.

A scale factor gamma (one per output channel, initialised to 1, so training starts from the pre-trained
function) multiplies the attention branch and the MLP branch of each of the first `difffit_blocks` transformer
blocks (METHOD.md: blocks 1-14 of DiT-XL/2). The whole tunable set trains at the optimizer's LR times
`lr_scale` (the paper: x10). gamma is a parameter of the branch module itself, applied by a forward hook, so
that every other weight keeps its name and ZeRO-3 gathers gamma with its branch; the merged export folds gamma
into the branch's output linear: gamma * (W x + b) = (gamma W) x + gamma b.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.normalization import RMSNorm

from models.tuning import freeze_all_but, requires_grad_names, write_tuning_config

GAMMA = "difffit_gamma"
# Modules whose own affine weights count as "norms". Adaptive norms (AdaLayerNormZero) are left out on purpose:
# their parameters are the modulation MLP, not a normalization's scale and shift.
NORM_TYPES = (
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase, RMSNorm,
)  # fmt: skip


def _scale_output(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, GAMMA)


def output_linear_name(branch: torch.nn.Module) -> str:
    """The linear layer whose output is the branch's output (where gamma folds in)."""
    if isinstance(branch, Attention):
        if branch.residual_connection:
            raise ValueError("DiffFit: an attention branch with its own residual connection cannot fold gamma")
        return "to_out.0"
    linears = [name for name, module in branch.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"DiffFit: the branch {type(branch).__name__} has no output linear layer to fold gamma")
    return linears[-1]


def documented_names(denoiser: torch.nn.Module) -> list[str]:
    """Biases, the affine weights of normalization layers, and the class-embedding tables (not the gammas)."""
    names = [name for name, _ in denoiser.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    for prefix, module in denoiser.named_modules():
        if isinstance(module, (*NORM_TYPES, LabelEmbedding)):  # LabelEmbedding holds its table in an nn.Embedding
            names += [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters()]
    return sorted(set(names))


class DiffFit:
    name = "difffit"

    def __init__(self, num_blocks: int = 14, lr_scale: float = 10.0) -> None:
        self.num_blocks, self.lr_scale = num_blocks, lr_scale
        self.folds: dict[str, str] = {}  # gamma's name -> prefix of the linear it folds into
        self.names: list[str] = []

    @classmethod
    def from_settings(cls, settings) -> DiffFit:
        return cls(settings.difffit_blocks, settings.lr_scale)

    def apply(self, denoiser: torch.nn.Module) -> None:
        blocks = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, BasicTransformerBlock)]
        if not blocks:
            raise ValueError(
                f"DiffFit scales the attention and MLP branches of transformer blocks, and {type(denoiser).__name__} "
                "has no BasicTransformerBlock: choose method.peft=bitfit, lora or full"
            )
        if not 1 <= self.num_blocks <= len(blocks):
            raise ValueError(
                f"peft.difffit_blocks={self.num_blocks}, but {type(denoiser).__name__} has {len(blocks)} transformer "
                f"blocks: set peft.difffit_blocks between 1 and {len(blocks)}"
            )
        for block_name, block in blocks[: self.num_blocks]:
            for branch_name in ("attn1", "ff"):
                branch = getattr(block, branch_name)
                linear = output_linear_name(branch)
                width = branch.get_submodule(linear).out_features
                reference = branch.get_submodule(linear).weight
                branch.register_parameter(GAMMA, torch.nn.Parameter(torch.ones(width, dtype=reference.dtype)))
                branch.register_forward_hook(_scale_output)
                self.folds[f"{block_name}.{branch_name}.{GAMMA}"] = f"{block_name}.{branch_name}.{linear}"
        self.names = sorted({*documented_names(denoiser), *self.folds})
        freeze_all_but(denoiser, set(self.names))

    def parameter_groups(self, denoiser: torch.nn.Module, lr: float) -> list[dict]:
        scaled = lr * self.lr_scale
        return [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": scaled, "base_lr": scaled}]

    def trainable_names(self, denoiser: torch.nn.Module) -> list[str]:
        return requires_grad_names(denoiser)

    def merged_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        merged = {k: v for k, v in denoiser_state.items() if k not in self.folds}
        for gamma_name, linear in self.folds.items():
            gamma = denoiser_state[gamma_name]
            merged[f"{linear}.weight"] = denoiser_state[f"{linear}.weight"] * gamma[:, None]
            if f"{linear}.bias" in denoiser_state:
                merged[f"{linear}.bias"] = denoiser_state[f"{linear}.bias"] * gamma
        return merged

    def adapter_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: denoiser_state[name] for name in self.names}

    def write_adapter_config(self, directory: Path) -> None:
        note = "apply DiffFit(difffit_blocks) to the plain model, then load_state_dict(adapter, strict=False)"
        config = {"method": self.name, "difffit_blocks": self.num_blocks, "gammas_fold_into": self.folds}
        write_tuning_config(directory, {**config, "note": note})
