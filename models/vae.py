"""The VAE of a latent family: pixels <-> the model space its shards hold, (latent - shift factor) * scaling factor
(SD 1.5 has no shift factor; SD3's and Flux's VAEs have one, as their pipelines apply it)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

Generators = list[torch.Generator] | torch.Generator | None


def vae_downsampling(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel along a side: one factor 2 per down block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def vae_encode(vae: AutoencoderKL, pixels: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One sample of the posterior per image, scaled: a list of generators (one per image) makes each latent depend
    only on its own seed, whatever the batching; None draws from the global generator."""
    x = pixels.to(vae.device, vae.dtype)
    return (vae.encode(x).latent_dist.sample(generator=generator) - _shift(vae)) * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to pixels in [-1, 1], on the VAE's device."""
    latents = latents.to(vae.device, vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor + _shift(vae)).sample.clamp(-1, 1)


def _shift(vae: AutoencoderKL) -> float:
    return vae.config.get("shift_factor") or 0.0
