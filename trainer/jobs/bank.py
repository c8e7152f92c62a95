"""The memory bank: samples of the pre-trained model, generated once, straight into shards (METHOD.md).

Sample i is a pure function of (weights, generation config, seed, i) (DESIGN invariant 2): its class and
initial noise come from a generator seeded by (bank.seed, i), and DDIM is deterministic. Batches are cut
at fixed offsets inside each shard, so the arithmetic does not depend on the number of ranks either, and
the same bank comes out of 1 process or 64. Each rank writes only the shards it owns, skipping complete
ones; rank 0 writes the manifest once every shard is complete.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.files import atomic_write_bytes
from data.formats import open_shard_set
from models.annotators import annotate_batch, annotator_for, to_uint8
from models.family import state_sha256
from trainer import distributed
from trainer.config import BankConfig, Config, ConfigError
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.metrics import image_grid
from trainer.setup import load_family

BANK_FIELDS = {"x": "npy", "label": "cls", "meta": "json"}
CONTROLNET_BANK_FIELDS = {"x": "npy", "tokens": "npy", "control": "png", "meta": "json"}
GENERATOR_VERSION = 2  # bump when the recipe below changes, so that old banks are not extended with new samples


def check_bank_config(bank: BankConfig) -> None:
    for key in ("num_samples", "samples_per_shard", "batch_size", "num_steps"):
        if getattr(bank, key) < 1:
            raise ConfigError(f"bank.{key}={getattr(bank, key)} must be at least 1")
    if bank.preview < 0 or bank.seed < 0:
        raise ConfigError(f"bank.preview={bank.preview} and bank.seed={bank.seed} must be >= 0 (preview 0: no grid)")


def sample_start(seed: int, index: int, num_classes: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """Class (uniform over the pre-trained label space) and initial noise of bank sample `index`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(num_classes))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(rng.integers(2**63))))
    return label, noise


def bank_samples(
    family, denoiser: torch.nn.Module, indices: range, bank: BankConfig, on_batch: Callable[[int], None]
) -> Iterator[dict]:
    """The samples of one shard, in batches of bank.batch_size aligned to the shard's first index."""
    num_classes = family.null_condition  # the pre-trained label space: the bank is loaded with num_classes=0
    for first in range(indices.start, indices.stop, bank.batch_size):
        batch = range(first, min(first + bank.batch_size, indices.stop))
        starts = [sample_start(bank.seed, i, num_classes, family.sample_shape) for i in batch]
        labels = torch.tensor([label for label, _ in starts], dtype=torch.long)
        noise = torch.stack([n for _, n in starts])
        # The latent itself (or, in pixel space, the sample): decoding to PNG and re-encoding would add
        # quantisation and a second VAE pass to what the trainer reads.
        x = family.sample(
            denoiser, labels, num_steps=bank.num_steps, guidance_scale=bank.guidance_scale, noise=noise, decode=False
        )
        x = x.float().cpu().numpy()
        on_batch(len(batch))
        for position, i in enumerate(batch):
            label = int(labels[position])
            yield {"x": x[position], "label": label, "meta": {"index": i, "seed": bank.seed, "class": label}}


def controlnet_bank_samples(
    family, annotate, prompts: list[str], indices: range, bank: BankConfig, on_batch: Callable[[int], None]
) -> Iterator[dict]:
    """Stable Diffusion's own samples (no ControlNet: the pre-trained model generates freely), each with the control
    annotated from its decoded image and the default prompt's tokens, the null condition bank slots train with."""
    null_tokens = family.null_tokens.numpy().astype(np.int32)
    for first in range(indices.start, indices.stop, bank.batch_size):
        batch = range(first, min(first + bank.batch_size, indices.stop))
        starts = [sample_start(bank.seed, i, len(prompts), family.sample_shape) for i in batch]
        tokens = family.tokenize([prompts[k] for k, _ in starts])
        noise = torch.stack([n for _, n in starts])
        x = family.sample(
            None, tokens, num_steps=bank.num_steps, guidance_scale=bank.guidance_scale, noise=noise, decode=False
        )
        controls = annotate_batch(annotate, to_uint8(family.decode(x)))
        x = x.float().cpu().numpy()
        on_batch(len(batch))
        for position, i in enumerate(batch):
            meta = {"index": i, "seed": bank.seed, "prompt": prompts[starts[position][0]]}
            yield {"x": x[position], "tokens": null_tokens, "control": controls[position], "meta": meta}


def bank_recipe(cfg: Config, family, device: torch.device) -> tuple[dict, dict, Callable]:
    """(fields, the settings that decide the samples' bytes, samples(indices, on_batch)) of the family's bank."""
    bank, m = cfg.bank, cfg.model.sd_controlnet
    if cfg.model.family != "sd_controlnet":
        denoiser = family.denoiser.to(device).eval()
        settings = {
            "weights_sha256": state_sha256(family.denoiser), "num_classes": family.null_condition,
            "clip_sample": family.sampling_scheduler().config.get("clip_sample"),  # EDM's sampler has no x0 clip
            "original_timestep_frequencies": family.original_timestep_frequencies,
        }  # fmt: skip
        return BANK_FIELDS, settings, lambda indices, on_batch: bank_samples(family, denoiser, indices, bank, on_batch)
    annotate = annotator_for(m.control, m.annotator, tuple(m.canny_thresholds))
    if annotate is None:
        raise ConfigError(
            f"model.sd_controlnet.control={m.control}: the bank's controls are annotated from its generated images and "
            f"{m.control} has no built-in annotator: set model.sd_controlnet.annotator=path/to/module.py[:function]"
        )
    family.place_frozen(device)
    prompts = list(bank.prompts) or [m.default_prompt]
    settings = {
        "weights_sha256": family.frozen_fingerprint(), "control": m.control, "annotator": m.annotator,
        "canny_thresholds": list(m.canny_thresholds), "prompts": prompts, "null_tokens": family.null_tokens.tolist(),
    }  # fmt: skip
    samples = lambda indices, on_batch: controlnet_bank_samples(family, annotate, prompts, indices, bank, on_batch)  # noqa: E731
    return CONTROLNET_BANK_FIELDS, settings, samples


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
