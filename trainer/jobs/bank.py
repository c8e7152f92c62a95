"""The memory bank: samples of the pre-trained model, generated once, straight into shards (METHOD.md).

Sample i is a pure function of (weights, generation config, seed, i) (DESIGN invariant 2): its class and
initial noise come from a generator seeded by (bank.seed, i), and DDIM is deterministic. Batches are cut
at fixed offsets inside each shard, so the arithmetic does not depend on the number of ranks either, and
the same bank comes out of 1 process or 64. Each rank writes only the shards it owns, skipping complete
ones; rank 0 writes the manifest once every shard is complete.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.files import atomic_write_bytes
from data.formats import open_shard_set
from trainer import distributed
from trainer.config import BankConfig, Config, ConfigError
from trainer.jobs.kinds import BankRecipe, data_kind
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.metrics import image_grid
from trainer.setup import load_family

GENERATOR_VERSION = 2  # bump when a data kind's bank recipe changes: old banks are then not extended


def check_bank_config(bank: BankConfig) -> None:
    for key in ("num_samples", "samples_per_shard", "batch_size", "num_steps"):
        if getattr(bank, key) < 1:
            raise ConfigError(f"bank.{key}={getattr(bank, key)} must be at least 1")
    if bank.preview < 0 or bank.seed < 0:
        raise ConfigError(f"bank.preview={bank.preview} and bank.seed={bank.seed} must be >= 0 (preview 0: no grid)")


def bank_recipe(cfg: Config, family, device: torch.device) -> BankRecipe:
    """(fields, the settings that decide the samples' bytes, samples(indices, on_batch)) of the family's bank."""
    return data_kind(family.data_kind).bank_recipe(cfg, family, device)


def generate_bank(cfg: Config) -> Path:
    """Fills cfg.data.bank with cfg.bank.num_samples samples of the pre-trained model; returns the folder."""
    check_bank_config(cfg.bank)
    rank, world, device = distributed.init()
    return _generate_bank(cfg, rank, world, device)


def _generate_bank(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    family = load_family(cfg, num_classes=0)
    bank, directory = cfg.bank, Path(cfg.data.bank)
    fields, settings, make_samples = bank_recipe(cfg, family, device)
    job = {
        "kind": "bank",
        "generator_version": GENERATOR_VERSION,
        **settings,
        "sample_shape": list(family.sample_shape),
        **{key: getattr(bank, key) for key in ("num_samples", "samples_per_shard", "batch_size", "num_steps")},
        "guidance_scale": bank.guidance_scale,
        "seed": bank.seed,
        "format": cfg.data.format,
    }
    shard_job = ShardJob(directory, job, "data.bank", **shard_job_settings(cfg, rank, world, device))
    meta = {
        "kind": "bank",
        "generator": {
            "pretrained": str(Path(cfg.model.pretrained).resolve()),
            "num_steps": bank.num_steps,
            "guidance_scale": bank.guidance_scale,
            "seed": bank.seed,
            "num_samples": bank.num_samples,
            "weights_sha256": job["weights_sha256"],
        },
        **{key: value for key, value in settings.items() if key != "weights_sha256"},
    }
    preview = (lambda: write_preview(family, directory, bank.preview, device)) if bank.preview else None
    result = shard_job.run(
        bank.num_samples, bank.samples_per_shard, fields, make_samples, meta, finish=preview, progress="bank"
    )
    generated, seconds = result.num_built, result.seconds
    if rank == 0:
        print(
            f"bank: {generated} samples generated ({bank.num_samples - generated} already complete) in {seconds:.2f} s "
            f"on {world} rank(s): {generated / max(seconds, 1e-9):.2f} samples/s -> {directory}",
            flush=True,
        )
    return directory


def write_preview(family, directory: Path, num_images: int, device: torch.device) -> Path:
    """A decoded grid of the first samples, for a human to look at (rank 0; not read by any job)."""
    dataset = open_shard_set(directory, verify="none")  # just checked by merge_manifest
    x = torch.from_numpy(np.stack([dataset[i]["x"] for i in range(min(num_images, len(dataset)))]))
    dataset.close()
    family.place_frozen(device)
    images = family.decode(x.to(device))
    buffer = io.BytesIO()
    Image.fromarray(image_grid(images)).save(buffer, format="PNG")
    path = directory / "preview.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path
