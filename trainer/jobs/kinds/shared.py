"""What every data kind uses: the per-sample seeds of the encoding and of the bank's starts, the check that an
encoded image fits the denoiser, and the report's name and size."""

from __future__ import annotations

import os

import numpy as np
import torch

from data.shard_jobs import derived_seed
from trainer.config import ConfigError

REPORT_NAME = "report.json"
VIEWS = {"x": 0, "x_flip": 1}  # the view number enters the latent's seed
NUM_THREADS = min(8, os.cpu_count() or 1)
MAX_PRINTED = 20  # unreadable paths printed in the summary; report.json lists them all


def check_resolution(family, resolution: int) -> None:
    """The encoded image must have the denoiser's input shape; say which resolution would fit."""
    factor = family.latent_downsampling
    # One block of factor x factor pixels encodes to one model-space pixel: its channels are the encoding's.
    probe = family.encode(torch.zeros(1, 3, factor, factor), torch.Generator().manual_seed(0))
    got = (probe.shape[1], resolution // factor, resolution // factor)
    if resolution % factor or got != tuple(family.sample_shape):
        raise ConfigError(
            f"prepare.resolution={resolution} gives {'latents' if factor > 1 else 'images'} of shape {got}, but the "
            f"model expects {tuple(family.sample_shape)}: set prepare.resolution={family.sample_shape[-1] * factor}"
        )


def encode(family, images: np.ndarray, seed: int, indices: range, view: int) -> np.ndarray:
    """Model-space x of a batch of images in [-1, 1] (`family.encode`).

    With a VAE we store ONE posterior sample per view, drawn from a generator seeded by (seed, index, view):
    it is reproducible whatever the batching or number of ranks, takes half the storage of mean + std, and is
    what DiT-style training sees anyway (a sample of the posterior, not its mean)."""
    generators = [torch.Generator().manual_seed(derived_seed(seed, i, view)) for i in indices]
    return family.encode(torch.from_numpy(images), generators).float().cpu().numpy()


def sample_start(seed: int, index: int, num_classes: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """Class (uniform over the pre-trained label space) and initial noise of bank sample `index`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(num_classes))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(rng.integers(2**63))))
    return label, noise
