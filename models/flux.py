"""The Flux family: a `FluxTransformer2DModel` trained by flow matching; the transformer trains.

Everything but the network's call and the sampler's time grid is SD3's (`models/sd3.py`): the cached prompt
embeddings (Flux's: CLIP-L pooled, T5 per token), the null prompt, the VAE with its shift factor, the exports (a
`FluxPipeline` folder; LoRA adapters that `FluxPipeline.load_lora_weights` reads).

What differs:
- the transformer takes 2x2 patches of the latents packed into tokens, with position ids, and a timestep in (0, 1);
  the shards hold unpacked latents (C, H, W) like every family's, `predict` packs and unpacks them;
- FLUX.1-dev is guidance-distilled: classifier-free guidance is an input (`guidance`), not a second pass. Training
  feeds the fixed `model.flux.guidance` (3.5 by default, as diffusers' Flux DreamBooth script); sampling (the bank,
  previews) feeds its guidance scale, one forward a step: generate the bank at bank.guidance_scale =
  model.flux.guidance, so that bank slots retain what the model does at the guidance it trains with. A transformer
  without the guidance input (FLUX.1-schnell) is guided by a second pass against the empty prompt, as SD3;
- the shift of t depends on the image's token count (diffusers' `calculate_shift` over the scheduler's base and
  max shifts, for model.flux.resolution): training draws logit-normal t shifted by it, and every sampler uses that
  same shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from models.sd3 import SD3Family, TextCondition
from models.vae import vae_downsampling

PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")  # CLIP-L
T5_PARTS = ("text_encoder_2", "tokenizer_2")


class FluxFamily(SD3Family):
    name = "flux"
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    parts, t5_parts = PARTS, T5_PARTS
    text_encoder_names = ("text_encoder", "text_encoder_2")
    t5_optional = False  # Flux's prompt is T5's: FluxPipeline has no path without it
    title = "Flux"
    own_settings = ("guidance", "resolution")

    def __init__(self, *args, guidance: float = 3.5, resolution: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance = float(guidance)
        self.resolution = resolution or self.vae.config.sample_size
        patch = 2 * self.latent_downsampling  # a token is 2x2 latent pixels
        if self.resolution % patch:
            fits = patch * max(1, self.resolution // patch)
            raise ValueError(
                f"model.flux.resolution={self.resolution}: Flux packs 2x2 latent pixels of a "
                f"{self.latent_downsampling}x VAE into a token, so the side must be a multiple of {patch} (e.g. {fits})"
            )
        self._position_ids: dict[tuple, torch.Tensor] = {}  # the image tokens' ids per (size, device, dtype)

    @staticmethod
    def default_time(scheduler_config: dict, transformer: torch.nn.Module, vae, settings: dict) -> dict:
        """Logit-normal (0, 1) shifted by Flux's resolution shift exp(mu) for the training images' token count."""
        side = (settings.get("resolution") or vae.config.sample_size) // vae_downsampling(vae)
        return {"shift": float(np.exp(image_mu(scheduler_config, (side // 2) ** 2)))}

    def sampling_config(self, folder_config: dict) -> dict:
        """The folder's scheduler with the training shift fixed: FLUX.1's exp(mu) of the training size (or the
        noise.shift set), which its time shift with sigma 1 equals, so every sampler (the evaluation's DPM-Solver++
        too) samples at the shift the model trains at. The export keeps the folder's own, dynamic scheduler."""
        return {**folder_config, "use_dynamic_shifting": False, "shift": self.process.time.shift}

    def export_scheduler_config(self) -> dict:
        return dict(self.folder_scheduler_config)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Latents (C, H, W) of model.flux.resolution (default: the VAE's sample size, 1024 px for FLUX.1):
        C is the transformer's input width over the 2x2 packing."""
        side = self.resolution // self.latent_downsampling
        return (self.transformer.config.in_channels // 4, side, side)

    def embedding_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prompt_embeds, pooled_embeds) shapes of one prompt: T5's tokens, CLIP-L's pooled output."""
        config = self.transformer.config
        return (self.max_sequence_length, config.joint_attention_dim), (config.pooled_projection_dim,)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """The prompts' embeddings as FluxPipeline computes them: T5's per token, CLIP-L's pooled (float32)."""
        embeds, pooled, _ = self.text_encoders().encode_prompt(
            prompts, None, device=self.vae.device, max_sequence_length=self.max_sequence_length
        )
        return TextCondition(embeds.float(), pooled.float())

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: TextCondition):
        """The velocity (B, C, H, W) at flow timestep t (1000 times flow time), in x_t's dtype."""
        batch, channels, height, width = x_t.shape
        tokens = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
        image_ids = self.position_ids(height, width, x_t.device, x_t.dtype)
        text_ids = torch.zeros((condition.prompt_embeds.shape[1], 3), device=x_t.device, dtype=x_t.dtype)
        guidance = None
        if denoiser_config(denoiser).get("guidance_embeds"):
            guidance = torch.full((batch,), self.guidance, device=x_t.device, dtype=torch.float32)
        velocity = denoiser(
            hidden_states=tokens, timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
            pooled_projections=condition.pooled_embeds.to(x_t.dtype),
            encoder_hidden_states=condition.prompt_embeds.to(x_t.dtype), txt_ids=text_ids, img_ids=image_ids,
            return_dict=False,
        )[0]  # fmt: skip
        return FluxPipeline._unpack_latents(velocity, height, width, 1)

    def position_ids(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """FluxPipeline's ids of the image tokens, made once per size and device: diffusers builds them on the host
        and copies them over, which would make every step wait for the device."""
        key = (height, width, str(device), dtype)
        if key not in self._position_ids:
            self._position_ids[key] = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
        return self._position_ids[key]

    def guided_epsilon(
        self,
        denoiser: torch.nn.Module | None,
        x_in: torch.Tensor,
        t: torch.Tensor,
        condition: TextCondition,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity (float32) of one reverse step: with the guidance input set to `guidance_scale` where the
        transformer has one (FLUX.1-dev), else classifier-free guidance against the empty prompt (as SD3)."""
        denoiser = self.transformer if denoiser is None else denoiser
        if not denoiser_config(denoiser).get("guidance_embeds"):
            return super().guided_epsilon(denoiser, x_in, t, condition, guidance_scale)
        t_batch = torch.as_tensor(t, device=x_in.device).expand(len(x_in))
        trained, self.guidance = self.guidance, guidance_scale
        try:
            return self.predict(denoiser, x_in, t_batch, condition).float()
        finally:
            self.guidance = trained

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        """FluxPipeline's grid: sigmas from 1 to 1/N, shifted (by the training shift, `sampling_config`)."""
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))

    def compile_blocks(self, **options) -> None:
        """torch.compile each double-stream and each single-stream block in place."""
        for block in [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]:
            block.compile(**options)

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """A FluxPipeline folder (see `SD3Family.export`)."""
        super().export(state_dict, directory, class_names)


def denoiser_config(denoiser: torch.nn.Module) -> dict:
    """The transformer's config, also through a DeepSpeed engine or a compiled wrapper."""
    module = getattr(denoiser, "module", denoiser)
    return dict(getattr(module, "config", {}))


def image_mu(scheduler_config: dict, num_tokens: int) -> float:
    """Flux's log-shift for an image of `num_tokens` packed tokens, from the scheduler's base and max shifts."""
    return calculate_shift(
        num_tokens, scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15),
    )  # fmt: skip
