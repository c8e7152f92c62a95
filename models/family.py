"""What the trainer, the data jobs and the evaluation need from a model family: one typed Protocol.

A family is one module behind this interface (`models/dit.py`, `models/dit_edm.py`, `models/sd_controlnet.py`),
registered by name in `models/__init__.py`. Its denoiser is the module that trains (DeepSpeed wraps it); the parts
that do not train (VAE, frozen UNet, text encoder) stay plain attributes of the family: code outside the family
reaches them only through these members (`encode`, `decode`, `place_frozen`, `frozen_fingerprint`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from models.noise import NoiseProcess


@runtime_checkable
class ModelFamily(Protocol):
    name: str
    data_kind: str  # a key of trainer.jobs.kinds.DATA_KINDS: how its data is prepared and its bank generated
    condition_fields: tuple[str, ...]  # the shard fields `condition` reads

    @classmethod
    def from_pretrained(cls, pretrained: str, **settings: Any) -> ModelFamily:
        """Builds the family from a local folder (never a download); raises FileNotFoundError naming the key."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module that trains."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a sample in the model's space (latents or pixels): the shards' field 'x'."""

    @property
    def null_condition(self) -> Any:
        """The condition of bank and dropped slots (DiT: the null class id; SD: the default prompt's tokens)."""

    @property
    def noise_process(self) -> NoiseProcess:
        """How the model is noised and trained (`models/noise/`); Diff-Tuning's split lives on its levels."""

    def condition(self, fields: dict[str, torch.Tensor], null_condition: torch.Tensor) -> Any:
        """What `predict` takes, from the slots' condition fields; the null condition where the mask is set."""

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """The network's raw output at the process's model input (`noise_process.model_input`)."""

    def tunable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters the optimizer sees (those with requires_grad, after a PEFT method froze the rest)."""

    def place_frozen(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Moves the parts that do not train to the training device, in the training precision."""

    def compile_blocks(self, **options: Any) -> None:
        """torch.compile the denoiser's blocks in place (the state dict keeps its names)."""

    def denoiser_from_state_dict(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A plain copy of the denoiser holding other weights (EMA, gathered raw weights)."""

    def guided_epsilon(
        self,
        denoiser: torch.nn.Module | None,
        x_in: torch.Tensor,
        t: torch.Tensor,
        condition: Any,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The prediction one reverse step uses (a diffusers scheduler's model output) at the scheduler's model
        input `x_in` and timestep `t`, with classifier-free guidance against the family's unconditional input:
        what `sample` steps with, and what the evaluation's sampling chains switch between models."""

    samplers: tuple[str, ...]  # the samplers `sampling_scheduler` offers (models/samplers.py); the first: `sample`'s

    def sampling_scheduler(self, sampler: str = ...) -> Any:
        """A diffusers scheduler over the family's noise schedule, by name (one of `samplers`; by default the first,
        the one `sample` steps with); its `.config` holds the sampler settings (e.g. clip_sample)."""

    def sample(self, denoiser: torch.nn.Module, *conditions: Any, **options: Any) -> torch.Tensor:
        """Samples for the given conditions (the bank's generator, the evaluation's sampler)."""

    @property
    def latent_downsampling(self) -> int:
        """Pixels per model-space pixel along a side: 1 for pixel-space families, the VAE's factor otherwise."""

    def encode(self, pixels: torch.Tensor, generator: list[torch.Generator] | torch.Generator | None) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) to the model space the shards hold: the pixels themselves, or one sample
        of the VAE's posterior times its scaling factor (one generator per image: each latent depends on its seed
        only). On the device of the frozen parts (`place_frozen`)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples to pixels in [-1, 1] (pixel-space families: the samples, clamped)."""

    def frozen_fingerprint(self) -> str | None:
        """sha256 over the weights of the parts that do not train (None when there are none): the data jobs record
        it in job.json, so that a rerun with other frozen weights at the same path is refused."""

    def preview(self, denoiser: torch.nn.Module, num_images: int, num_steps: int, seed: int = 0) -> torch.Tensor:
        """A fixed set of samples for the grids logged during training."""

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """Writes a folder that the family's library loads (diffusers) and `from_pretrained` loads back."""

    def check_data(self, sample: dict, meta: dict, key: str) -> None:
        """Raises ValueError naming `key` when a data set (its first `sample` and its manifest's `meta`) does not
        fit this family beyond the shape of 'x', which the trainer checks itself (e.g. cached prompt embeddings of
        another text encoder setting)."""

    def export_adapter(self, adapter: dict[str, torch.Tensor], directory: Path) -> None:
        """Writes a PEFT adapter (peft's parameter names) where its pipeline's LoRA loader reads it (SD3:
        `load_lora_weights`), beside peft's own files; a family whose pipeline has no LoRA loader writes nothing."""


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor (a plan's mask, row indices) on `device` without the host waiting: on CUDA copied from pinned
    memory, non-blocking (a copy from pageable memory blocks the host until the stream gets to it); else `.to`."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def state_sha256(module: torch.nn.Module) -> str:
    """Fingerprint of a module's weights (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def combined_sha256(modules: list[torch.nn.Module]) -> str:
    """One fingerprint of several modules' weights, in order."""
    return hashlib.sha256("".join(state_sha256(module) for module in modules).encode()).hexdigest()


def missing_members(family: type | object) -> list[str]:
    """The members of `ModelFamily` that a family class (or instance) lacks: [] for a complete family."""
    return sorted(name for name in family_members() if not hasattr(family, name))


def family_members() -> list[str]:
    """The names a family must have: the Protocol's methods, properties and attributes."""
    names = set(ModelFamily.__annotations__) | {name for name in vars(ModelFamily) if not name.startswith("_")}
    return sorted(names)
