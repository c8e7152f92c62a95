"""Tiny models and shard sets, built and saved to disk so that tests run the real loading paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from data.shards import shard_name, write_manifest, write_shard

TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=3,
    out_channels=6,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
    norm_num_groups=1,
)


def make_tiny_dit(
    folder: Path, *, seed: int = 0, latent: bool = False, num_classes: int = 10, **overrides: int
) -> Path:
    """A random tiny DiT saved as a diffusers folder (transformer/, scheduler/ and, if latent, vae/)."""
    torch.manual_seed(seed)
    config = dict(TINY_DIT, num_embeds_ada_norm=num_classes, **overrides)
    if latent:
        config.update(in_channels=4, out_channels=8, sample_size=4)
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=8,
        ).save_pretrained(folder / "vae")
    model = DiTTransformer2DModel(**config)
    with torch.no_grad():  # DiT zero-initialises its output layers; random weights make the tests bite
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.save_pretrained(folder / "transformer")
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        folder / "scheduler"
    )
    return folder


def make_shards(
    folder: Path,
    num_samples: int,
    *,
    shape=(3, 8, 8),
    num_classes: int = 4,
    per_shard: int = 16,
    seed: int = 0,
    classes: bool = True,
) -> Path:
    """Random samples with labels, written as shards with a manifest."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, *shape)).astype(np.float32).clip(-1, 1)
    labels = rng.integers(0, num_classes, num_samples)
    fields = {"x": "npy", "label": "cls"}
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for shard, first in enumerate(range(0, num_samples, per_shard)):
        samples = [{"x": x[i], "label": int(labels[i])} for i in range(first, min(first + per_shard, num_samples))]
        records.append(write_shard(folder / shard_name(shard), samples, fields, first))
    meta = {"classes": [f"class_{i}" for i in range(num_classes)]} if classes else {}
    write_manifest(folder, records, fields, meta)
    return folder
