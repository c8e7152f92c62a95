"""Evaluation of a model folder (pre-trained or exported): samples, and denoising error by noise level."""

from __future__ import annotations

import torch

from models import family_class
from trainer.loss import NoiseSchedule


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


@torch.no_grad()
def denoising_error(
    folder: str, images: torch.Tensor, labels: torch.Tensor | None, bands: list[tuple[int, int]], *, seed: int
) -> list[float]:
    """Mean ε-prediction MSE of a diffusers DiT folder on `images` (float NCHW in [-1, 1]) per timestep band
    [a, b): how well the model denoises these images at each noise level, i.e. the chain of forgetting measured.
    Every image is noised once per band at a seeded t; `labels=None` asks for the model's null class."""
    family = family_class("dit").from_pretrained(folder)
    model = family.denoiser.eval()
    schedule = NoiseSchedule(family.betas())
    if labels is None:
        labels = torch.full((len(images),), family.null_condition)
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for low, high in bands:
        t = torch.randint(low, high, (len(images),), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        epsilon = family.predict(model, schedule.add_noise(images, noise, t), t, labels)[:, : images.shape[1]]
        errors.append(float(((epsilon - noise) ** 2).mean()))
    return errors
