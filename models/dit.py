"""The DiT family: a class-conditional `DiTTransformer2DModel`, an optional VAE, the pre-trained schedule.

Loads a local diffusers folder (a `DiTPipeline` folder, or a bare transformer folder) or an original
`DiT-XL-2-256x256.pt`; maps the label space onto K target classes keeping the pre-trained null row,
because Diff-Tuning's retention trains the unconditional branch through it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from models.dit_convert import use_original_timestep_frequencies
from models.dit_weights import (
    EMBEDDER,
    copy_into_parameter,
    embedder_copies_equal,
    open_weights,
    relabelled,
    stream_into,
)
from models.family import state_sha256, to_device
from models.noise.ddpm import DDPMProcess
from models.samplers import DDPM_SAMPLERS, ddpm_sampler, initial_sample, scaled_input
from models.vae import Generators, vae_decode, vae_downsampling, vae_encode

# DiTPipeline hard-codes the null class id of ImageNet DiT, so exports pad the label table up to it.
DITPIPELINE_NULL_CLASS = 1000
# DiT's own training schedule, used when the pre-trained weights come without a scheduler config.
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
# Written into an export's transformer/config.json so that this family computes what the trained model did.
ORIGINAL_FREQUENCIES_KEY = "original_timestep_frequencies"


class DiTFamily:
    name = "dit"
    data_kind = "labels"  # how its data is prepared and its bank generated (trainer/jobs/kinds/)

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler_config: dict,
        *,
        shared_embedder: bool = False,
        original_timestep_frequencies: bool = False,
        latent_space: bool | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.shared_embedder = shared_embedder
        self.original_timestep_frequencies = original_timestep_frequencies
        # An original `.pt` DiT samples latents even without a VAE attached (the bank stores latents).
        self.latent_space = vae is not None if latent_space is None else latent_space
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
        clip_sample: bool | None = None,
        original_timestep_frequencies: bool = False,
        build_context: Callable[[], AbstractContextManager] = nullcontext,
        load_parameter: Callable[[torch.nn.Parameter, torch.Tensor], None] = copy_into_parameter,
    ) -> DiTFamily:
        """The transformer is built empty under `build_context()` (the trainer passes `deepspeed.zero.Init` under
        ZeRO-3, so that it is partitioned as it is built) and filled tensor by tensor through `load_parameter`.

        `clip_sample` (DDIM clamps its x0 estimate to [-1, 1]): None clips pixel-space models as the folder's
        scheduler says and never clips latent-space ones (a VAE, or an original `.pt`), as DiT samples unclipped.
        `original_timestep_frequencies`: DiT's own timestep features 10000^(-i/128) instead of diffusers'
        10000^(-i/127), for weights converted from DiT's release (training and sampling; see `export`).
        """
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(
                f"model.pretrained={pretrained} does not exist: point it to a local diffusers DiT folder "
                "(a DiTPipeline folder with transformer/, or a transformer folder) or an original DiT .pt"
            )
        scheduler_config, vae_folder, folder = dict(DIT_SCHEDULE), None, path
        if path.is_dir():
            folder = path / "transformer" if (path / "transformer").is_dir() else path
            if (path / "scheduler" / "scheduler_config.json").is_file():
                scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            vae_folder = path / "vae" if (path / "vae").is_dir() else None
        if vae is not None:
            if not Path(vae).is_dir():
                raise FileNotFoundError(
                    f"model.dit.vae={vae} is not a folder: point it to a local AutoencoderKL folder"
                )
            vae_folder = Path(vae)
        source = relabelled(open_weights(folder, num_attention_heads), num_classes, class_init, seed)
        try:
            # Weights converted from DiT hold one embedder copied into every block: train it as the one it is.
            shared = embedder_copies_equal(source)
            with build_context():
                transformer = DiTTransformer2DModel.from_config(source.config)
            if shared:
                share_embedder(transformer)
            stream_into(transformer, source, load_parameter)
        finally:
            source.close()
        original_frequencies = original_timestep_frequencies or _exported_with_original_frequencies(folder)
        if original_frequencies:
            use_original_timestep_frequencies(transformer)
        latent = vae_folder is not None or source.original
        if clip_sample is not None:
            scheduler_config["clip_sample"] = clip_sample
        elif latent:
            scheduler_config["clip_sample"] = False  # DiT samples latents unclipped
        else:
            scheduler_config["clip_sample"] = scheduler_config.get("clip_sample", True)  # diffusers' DDIM default
        vae_model = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False) if vae_folder else None
        return cls(
            transformer.eval(), vae_model, scheduler_config, shared_embedder=shared,
            original_timestep_frequencies=original_frequencies, latent_space=latent,
        )  # fmt: skip

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

    @cached_property
    def noise_process(self) -> DDPMProcess:
        """DiT's discrete DDPM process (epsilon and learned variance) over the pre-trained betas."""
        return DDPMProcess(self.betas())

    samplers = DDPM_SAMPLERS  # the names `sampling_scheduler` takes; the first is what `sample` uses

    def sampling_scheduler(self, sampler: str = "ddim"):
        """A diffusers scheduler over the pre-trained schedule: DDIM (what `sample` steps with) or DPM-Solver++."""
        return ddpm_sampler(self.scheduler_config, sampler)

    condition_fields = ("label",)  # the shard fields `condition` reads

    def condition(self, fields: dict[str, torch.Tensor], null_condition: torch.Tensor) -> torch.Tensor:
        """Class labels, with the null class where the slot's condition is null (bank, dropout)."""
        labels = fields["label"].long()
        return torch.where(to_device(null_condition, labels.device), self.null_condition, labels)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor):
        return denoiser(x_t, timestep=t, class_labels=condition).sample

    def tunable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in denoiser.parameters() if p.requires_grad]

    def place_frozen(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Moves the parts that do not train (the VAE) to the device the denoiser trains on, in the training
        precision (bf16 under train.precision=bf16)."""
        if self.vae is not None:
            self.vae.to(device, dtype)

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block in place (parameter names and the state dict are unchanged)."""
        for block in self.transformer.transformer_blocks:
            block.compile(**options)  # torch.compile options, e.g. backend

    def denoiser_from_state_dict(self, state_dict: dict[str, torch.Tensor]) -> DiTTransformer2DModel:
        """A plain copy of the transformer with other weights (EMA, gathered raw weights), laid out as the
        trained one (one shared embedder if it trains one)."""
        return self._plain_transformer(state_dict, shared=self.shared_embedder)

    def _plain_transformer(self, state_dict: dict[str, torch.Tensor], shared: bool) -> DiTTransformer2DModel:
        model = DiTTransformer2DModel.from_config(self.transformer.config)
        if self.shared_embedder:
            # A state dict names the shared embedder once per block, and only block 0's name is its parameter
            # (copies taken elsewhere, e.g. an EMA keyed by state_dict(), may be stale): block 0 is the truth.
            state_dict = {key: state_dict[_block0_name(key)] for key in state_dict}
        if shared:
            share_embedder(model)
        model.load_state_dict(state_dict)
        if self.original_timestep_frequencies:
            use_original_timestep_frequencies(model)
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
        """Deterministic samples (`sampling_scheduler`: DDIM with eta 0 here) for `labels` with classifier-free
        guidance, starting from `noise` (or noise drawn from `generator`); decoded to pixels if there is a VAE
        and `decode`.
        Pixel outputs are clamped to [-1, 1]; latents (an original `.pt` DiT's too) are returned as they are."""
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(num_steps)
        device = next(denoiser.parameters()).device
        if noise is None:
            noise = torch.randn((len(labels), *self.sample_shape), generator=generator)
        x = initial_sample(scheduler, noise.to(device))  # 1 for DDIM and flow; sigma_max-scaled for EDM's
        labels = labels.to(device)
        for t in scheduler.timesteps:
            x_in = scaled_input(scheduler, x, t)  # x itself for DDIM and flow; EDM's c_in x
            x = scheduler.step(self.guided_epsilon(denoiser, x_in, t, labels, guidance_scale), t, x).prev_sample
        if self.vae is not None and decode:
            return self.decode(x)
        return x if self.latent_space else x.clamp(-1, 1)

    def guided_epsilon(
        self,
        denoiser: torch.nn.Module,
        x_in: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The first C output channels (ε; EDM's raw output) for `labels`, guided against the null class."""
        t_batch = torch.as_tensor(t, device=x_in.device).expand(len(x_in))  # DDIM's integer t, or EDM's c_noise
        channels = self.sample_shape[0]
        if guidance_scale == 1.0:
            return self.predict(denoiser, x_in, t_batch, labels)[:, :channels]
        null = torch.full_like(labels, self.null_condition)
        both = self.predict(denoiser, torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
        cond, uncond = both[:, :channels].chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    # --- model space: pixels <-> what the shards hold -------------------------------------------------
    @property
    def latent_downsampling(self) -> int:
        return 1 if self.vae is None else vae_downsampling(self.vae)

    def encode(self, pixels: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The pixels themselves (as float32) in pixel space; with a VAE, one scaled posterior sample per image."""
        if self.vae is not None:
            return vae_encode(self.vae, pixels, generator)
        if self.latent_space:
            raise ValueError(
                "model.pretrained is a DiT that samples latents but no VAE comes with it, so images cannot be "
                "encoded: set model.vae to a local AutoencoderKL folder (DiT's sd-vae-ft-ema or -mse)"
            )
        return pixels.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to pixels in [-1, 1] with the VAE; without one, the samples clamped to [-1, 1]."""
        return latents.clamp(-1, 1) if self.vae is None else vae_decode(self.vae, latents)

    def frozen_fingerprint(self) -> str | None:
        """The VAE's weights (the transformer is the part that trains); None in pixel space."""
        return None if self.vae is None else state_sha256(self.vae)

    def preview(self, denoiser: torch.nn.Module, num_images: int, num_steps: int, seed: int = 0) -> torch.Tensor:
        """A fixed set of samples (classes in turn, fixed noise) for the grids logged during training."""
        labels = torch.arange(num_images) % self.null_condition
        return self.sample(denoiser, labels, num_steps=num_steps, generator=torch.Generator().manual_seed(seed))

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """A diffusers folder: a full `DiTPipeline` when there is a VAE, else transformer + scheduler.

        diffusers keeps one embedder per block: a shared embedder is written into every block (all copies equal).
        The scheduler carries an explicit `clip_sample`. With original timestep frequencies the transformer's
        config.json records `original_timestep_frequencies`; DiTPipeline ignores it (and computes diffusers'
        frequencies), this family re-applies it when it loads the folder.
        """
        directory = Path(directory)
        transformer = pad_label_table(self._plain_transformer(state_dict, shared=False), DITPIPELINE_NULL_CLASS)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        if self.vae is not None:
            vae = self.vae if self.vae.dtype == torch.float32 else copy.deepcopy(self.vae).float()
            DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(directory)
            # DiTPipeline reads id2label from model_index.json but does not write it itself.
            index = json.loads((directory / "model_index.json").read_text())
            index["id2label"] = {str(i): name for i, name in enumerate(class_names or [])}
            (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        else:
            transformer.save_pretrained(directory / "transformer")
            scheduler.save_pretrained(directory / "scheduler")
        if self.original_timestep_frequencies:
            record_original_frequencies(directory / "transformer")

    def check_data(self, sample: dict, meta: dict, key: str) -> None:
        """Nothing beyond 'x': the label space is checked against the data's classes by the trainer."""

    def export_adapter(self, adapter: dict[str, torch.Tensor], directory: Path) -> None:
        """Nothing beyond peft's files: DiTPipeline has no LoRA loader (peft's `inject_adapter_in_model` and
        `set_peft_model_state_dict` apply the adapter to the transformer)."""


def record_original_frequencies(transformer_folder: Path) -> None:
    """Marks an exported transformer as computing DiT's own timestep frequencies (this family re-applies them)."""
    config_path = transformer_folder / "config.json"
    config = json.loads(config_path.read_text())
    config[ORIGINAL_FREQUENCIES_KEY] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def share_embedder(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """One timestep/label embedder for every block, as DiT has: diffusers' per-block copies become block 0's
    module, so they are one set of parameters for the optimizer, ZeRO and the EMA."""
    shared = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb = shared
    return transformer


def _block0_name(key: str) -> str:
    """The name under which a shared embedder's tensor is a parameter: block 0's."""
    if key.startswith("transformer_blocks.") and f".{EMBEDDER}" in key:
        return "transformer_blocks.0." + key.split(".", 2)[2]
    return key


def _exported_with_original_frequencies(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get(ORIGINAL_FREQUENCIES_KEY, False))


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


def _disable_internal_label_dropout(transformer: torch.nn.Module) -> None:
    """diffusers drops labels with torch.rand in training mode; the trainer owns that decision (DESIGN.md)."""
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
