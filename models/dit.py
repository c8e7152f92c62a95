"""The DiT family: a class-conditional `DiTTransformer2DModel`, an optional VAE, the pre-trained schedule.

Loads a local diffusers folder (a `DiTPipeline` folder, or a bare transformer folder) or an original
`DiT-XL-2-256x256.pt`; maps the label space onto K target classes keeping the pre-trained null row,
because Diff-Tuning's retention trains the unconditional branch through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

# DiTPipeline hard-codes the null class id of ImageNet DiT, so exports pad the label table up to it.
DITPIPELINE_NULL_CLASS = 1000
# DiT's own training schedule, used when the pre-trained weights come without a scheduler config.
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


class DiTFamily:
    name = "dit"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL | None, scheduler_config: dict):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        _disable_internal_label_dropout(transformer)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        vae: str | None = None,
        num_classes: int = 0,
        class_init: str = "reuse",
        num_attention_heads: int = 16,
        seed: int = 0,
    ) -> DiTFamily:
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(
                f"model.pretrained={pretrained} does not exist: point it to a local diffusers DiT folder "
                "(a DiTPipeline folder with transformer/, or a transformer folder) or an original DiT .pt"
            )
        scheduler_config, vae_folder = dict(DIT_SCHEDULE), None
        if path.is_file():
            from models.dit_convert import dit_from_original_checkpoint

            # diffusers' DiT (and so DiTPipeline, which loads our export) embeds timesteps with frequencies
            # 10000^(-i/127) where the original uses 10000^(-i/128): keep diffusers' definition so that
            # training, sampling and the exported model all compute the same function.
            transformer = dit_from_original_checkpoint(
                path, num_attention_heads=num_attention_heads, original_timestep_frequencies=False
            )
        else:
            folder = path / "transformer" if (path / "transformer").is_dir() else path
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder} has no config.json: is model.pretrained a diffusers DiT folder?")
            transformer = DiTTransformer2DModel.from_pretrained(folder)
            if (path / "scheduler" / "scheduler_config.json").is_file():
                scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            vae_folder = path / "vae" if (path / "vae").is_dir() else None
        if vae is not None:
            if not Path(vae).is_dir():
                raise FileNotFoundError(f"model.vae={vae} is not a folder: point it to a local AutoencoderKL folder")
            vae_folder = Path(vae)
        vae_model = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False) if vae_folder else None
        transformer = relabel(transformer, num_classes, class_init, seed)
        return cls(transformer, vae_model, scheduler_config)

    # --- what the trainer needs -------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def null_condition(self) -> int:
        return self.transformer.config.num_embeds_ada_norm  # the extra last row of the label table

    def betas(self) -> np.ndarray:
        return DDPMScheduler.from_config(self.scheduler_config).betas.double().numpy()

    condition_fields = ("label",)  # the shard fields `condition` reads

    def condition(self, fields: dict[str, torch.Tensor], null_condition: torch.Tensor) -> torch.Tensor:
        """Class labels, with the null class where the slot's condition is null (bank, dropout)."""
        return torch.where(null_condition, self.null_condition, fields["label"].long())

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor):
        return denoiser(x_t, timestep=t, class_labels=condition).sample

    def tunable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in denoiser.parameters() if p.requires_grad]

    def place_frozen(self, device: torch.device) -> None:
        """Moves the parts that do not train (the VAE) to the device the denoiser trains on."""
        if self.vae is not None:
            self.vae.to(device)

    def denoiser_from_state_dict(self, state_dict: dict[str, torch.Tensor]) -> DiTTransformer2DModel:
        """A plain copy of the transformer with other weights (EMA, gathered raw weights)."""
        model = DiTTransformer2DModel.from_config(self.transformer.config)
        model.load_state_dict(state_dict)
        _disable_internal_label_dropout(model)
        return model.eval()

    # --- sampling and export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        denoiser: torch.nn.Module,
        labels: torch.Tensor,
        *,
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        decode: bool = True,
    ) -> torch.Tensor:
        """DDIM (eta 0, deterministic) samples for `labels` with classifier-free guidance, starting from
        `noise` (or noise drawn from `generator`); decoded to pixels if there is a VAE and `decode`.
        Pixel outputs are clamped to [-1, 1]; latents are returned as they are."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        device = next(denoiser.parameters()).device
        if noise is None:
            noise = torch.randn((len(labels), *self.sample_shape), generator=generator)
        x = noise.to(device)
        labels = labels.to(device)
        null = torch.full_like(labels, self.null_condition)
        channels = self.sample_shape[0]
        for t in scheduler.timesteps:
            t_batch = torch.full((len(labels),), int(t), device=device, dtype=torch.long)
            if guidance_scale == 1.0:
                eps = self.predict(denoiser, x, t_batch, labels)[:, :channels]
            else:
                both = self.predict(
                    denoiser, torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null])
                )
                cond, uncond = both[:, :channels].chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        if self.vae is None:
            return x.clamp(-1, 1)
        return self.decode(x) if decode else x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (scaled by the VAE's scaling factor) to pixels in [-1, 1]."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def preview(self, denoiser: torch.nn.Module, num_images: int, num_steps: int, seed: int = 0) -> torch.Tensor:
        """A fixed set of samples (classes in turn, fixed noise) for the grids logged during training."""
        labels = torch.arange(num_images) % self.null_condition
        return self.sample(denoiser, labels, num_steps=num_steps, generator=torch.Generator().manual_seed(seed))

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """A diffusers folder: a full `DiTPipeline` when there is a VAE, else transformer + scheduler."""
        directory = Path(directory)
        transformer = self.denoiser_from_state_dict(state_dict)
        transformer = pad_label_table(transformer, DITPIPELINE_NULL_CLASS)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        if self.vae is not None:
            DiTPipeline(transformer=transformer, vae=self.vae, scheduler=scheduler).save_pretrained(directory)
            # DiTPipeline reads id2label from model_index.json but does not write it itself.
            index = json.loads((directory / "model_index.json").read_text())
            index["id2label"] = {str(i): name for i, name in enumerate(class_names or [])}
            (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        else:
            transformer.save_pretrained(directory / "transformer")
            scheduler.save_pretrained(directory / "scheduler")


def pad_label_table(transformer: DiTTransformer2DModel, num_classes: int) -> DiTTransformer2DModel:
    """Grows the label table to `num_classes` rows + null; the new rows copy the null row (unconditional)."""
    old = transformer.config.num_embeds_ada_norm
    if old >= num_classes:
        return transformer
    state = transformer.state_dict()
    for key in [k for k in state if k.endswith("class_embedder.embedding_table.weight")]:
        table = state[key]
        state[key] = torch.cat([table[:old], table[old:].expand(num_classes - old, -1), table[old:]])
    model = DiTTransformer2DModel.from_config({**transformer.config, "num_embeds_ada_norm": num_classes})
    model.load_state_dict(state)
    return model


def relabel(transformer: DiTTransformer2DModel, num_classes: int, class_init: str, seed: int = 0):
    """Maps the label table onto `num_classes` target classes; the pre-trained null row stays the null row."""
    old = transformer.config.num_embeds_ada_norm
    if num_classes == 0 or (num_classes == old and class_init == "reuse"):
        return transformer
    if class_init == "reuse" and num_classes > old:
        raise ValueError(
            f"model.num_classes={num_classes} is larger than the pre-trained label space ({old} classes), so "
            f"its rows cannot be reused: set model.num_classes <= {old} or model.class_init=fresh"
        )
    state = transformer.state_dict()
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    # One fresh table for every block: diffusers keeps a copy of DiT's single label table in each block.
    fresh = torch.randn((num_classes, width), generator=torch.Generator().manual_seed(seed)) * 0.02
    for key in [k for k in state if k.endswith("class_embedder.embedding_table.weight")]:
        table = state[key]
        rows = table[:num_classes] if class_init == "reuse" else fresh.to(table.dtype)
        state[key] = torch.cat([rows, table[old : old + 1]])
    config = {**transformer.config, "num_embeds_ada_norm": num_classes}
    model = DiTTransformer2DModel.from_config(config)
    model.load_state_dict(state)
    return model


def _disable_internal_label_dropout(transformer: torch.nn.Module) -> None:
    """diffusers drops labels with torch.rand in training mode; the trainer owns that decision (DESIGN.md)."""
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
