"""Evaluation: samples from a model folder (pre-trained or exported), and Fréchet distances to real images."""

from __future__ import annotations

import torch

from models import family_class


@torch.no_grad()
def sample_folder(
    folder: str, labels: torch.Tensor, *, num_steps: int, guidance_scale: float, seed: int, batch_size: int = 250
) -> torch.Tensor:
    """uint8 NCHW samples of a diffusers DiT folder for `labels`; sample i's noise depends only on (seed, i)."""
    family = family_class("dit").from_pretrained(folder)
    model = family.denoiser.eval()
    images = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size]
        noise = torch.stack(
            [torch.randn(family.sample_shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
             for i in range(len(batch))]
        )  # fmt: skip
        x = family.sample(model, batch, num_steps=num_steps, guidance_scale=guidance_scale, noise=noise)
        images.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(images)
