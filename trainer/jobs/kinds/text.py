"""Text-to-image data (SD3): (image, caption) pairs -> latents and the caption's embeddings, encoded once here so
that training runs no text encoder; and banks of the pre-trained model's own samples for the null prompt (or for
bank.prompts: class prompts, as DreamBooth's prior images), stored with their prompt's embeddings.

The embeddings are stored as float16 (SD3 at 256 T5 tokens: 333 x 4096 values, 2.7 MB a sample), as trainers of
SD3 cache them; the step casts them back to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data.images import CaptionListing, list_caption_folder, load_image_and_control, parse_background
from data.shard_jobs import shard_ranges
from models.family import state_sha256
from models.sd3 import TextCondition, as_stored
from trainer.config import BankConfig, Config, ConfigError
from trainer.jobs.kinds import BankRecipe
from trainer.jobs.kinds.captions import (
    caption_listing_sha256,
    entry_status,
    unreadable_entries,
    usable_entries,
    write_caption_report,
)
from trainer.jobs.kinds.shared import VIEWS, check_resolution, encode, sample_start
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.setup import load_family

FIELDS = {"x": "npy", "prompt_embeds": "npy", "pooled_embeds": "npy", "meta": "json"}  # target data and bank alike
EMBEDDING_DTYPE = np.float16


class CaptionedImages:
    name = "text"

    def prepare(self, cfg: Config, rank: int, world: int, device: torch.device) -> Path:
        return prepare_captioned_images(cfg, rank, world, device)

    def bank_recipe(self, cfg: Config, family, device: torch.device) -> BankRecipe:
        family.denoiser.to(device).eval()
        family.place_frozen(device)
        prompts = list(cfg.bank.prompts) or [family.null_prompt]
        settings = {
            "weights_sha256": combined_weights(family), "prompts": prompts,
            "max_sequence_length": family.max_sequence_length, "t5": family.t5,
        }  # fmt: skip
        samples = lambda indices, on_batch: bank_samples(family, prompts, indices, cfg.bank, on_batch)  # noqa: E731
        return BankRecipe(FIELDS, settings, samples)


KIND = CaptionedImages()


def combined_weights(family) -> str:
    """The bank's bytes depend on the transformer and on the frozen parts (the prompts' embeddings, the VAE)."""
    return f"{state_sha256(family.denoiser)}:{family.frozen_fingerprint()}"


# --- target data --------------------------------------------------------------------------------------------------
def prepare_captioned_images(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    """Writes latents and caption embeddings. No flipped views: captions may say left or right."""
    prepare, directory = cfg.prepare, Path(cfg.data.target)
    if prepare.hflip:
        raise ConfigError(
            f"prepare.hflip=true: model.family={cfg.model.family} data is not flipped (captions may say left or "
            "right); set prepare.hflip=false"
        )
    listing = list_caption_folder(prepare.images)
    controlled = [entry["image"] for entry in listing.entries if entry["control"] is not None]
    if controlled:
        raise ValueError(
            f'{listing.index}: sample {controlled[0]} has a "control", but model.family={cfg.model.family} takes '
            "images and captions only: remove the control entries"
        )
    family = load_family(cfg)
    check_resolution(family, prepare.resolution)
    status = entry_status(listing, rank, world, device)
    job = {
        "kind": "target", "files_sha256": caption_listing_sha256(listing),
        "encoder_sha256": family.frozen_fingerprint(), "max_sequence_length": family.max_sequence_length,
        "t5": family.t5, "sample_shape": list(family.sample_shape),
        **{key: getattr(prepare, key) for key in ("resolution", "samples_per_shard", "batch_size", "seed")},
        "background": list(parse_background(prepare.background)), "format": cfg.data.format,
    }  # fmt: skip
    shard_job = ShardJob(directory, job, "data.target", **shard_job_settings(cfg, rank, world, device))
    family.place_frozen(device)
    entries = usable_entries(listing, status)
    num_shards = len(shard_ranges(len(entries), prepare.samples_per_shard))

    def report() -> None:
        bad = unreadable_entries(listing, status)
        write_caption_report(directory, listing, len(entries), bad, num_shards, 0, samples="image-caption")

    shard_job.run(
        len(entries), prepare.samples_per_shard, FIELDS,
        lambda indices, on_batch: captioned_samples(family, listing, entries, indices, cfg, on_batch),
        {"source": str(listing.root.resolve()), **job}, finish=report, progress="prepare", unit="image",
    )  # fmt: skip
    return directory


def captioned_samples(
    family, listing: CaptionListing, entries: list[dict], indices: range, cfg: Config, on_batch: Callable[[int], None]
) -> Iterator[dict]:
    """The samples of one shard, in batches of prepare.batch_size aligned to the shard's first index."""
    prepare = cfg.prepare
    background = parse_background(prepare.background)
    for first in range(indices.start, indices.stop, prepare.batch_size):
        batch = [entries[i] for i in range(first, min(first + prepare.batch_size, indices.stop))]
        paths = [listing.root / e["image"] for e in batch]
        images = np.stack([load_image_and_control(p, None, prepare.resolution, False, background)[0] for p in paths])
        pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        latents = encode(family, pixels, prepare.seed, range(first, first + len(batch)), VIEWS["x"])
        embeds, pooled = embeddings(family, [e["caption"] for e in batch])
        on_batch(len(batch))
        for position, entry in enumerate(batch):
            meta = {"index": first + position, "image": entry["image"], "caption": entry["caption"]}
            yield {"x": latents[position], "prompt_embeds": embeds[position], "pooled_embeds": pooled[position],
                   "meta": meta}  # fmt: skip


def embeddings(family, prompts: list[str], chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The prompts' embeddings as the shards store them (float16), encoded `chunk` prompts at a time."""
    parts = []
    for first in range(0, len(prompts), chunk):
        condition = family.encode_prompts(prompts[first : first + chunk])
        encoded = (condition.prompt_embeds, condition.pooled_embeds)
        parts.append([as_stored(x).cpu().numpy().astype(EMBEDDING_DTYPE) for x in encoded])
    return tuple(np.concatenate(column) for column in zip(*parts))


# --- the bank -----------------------------------------------------------------------------------------------------
def bank_samples(
    family, prompts: list[str], indices: range, bank: BankConfig, on_batch: Callable[[int], None]
) -> Iterator[dict]:
    """The pre-trained model's samples, each for one of `prompts` (drawn per sample with its noise from
    (bank.seed, index)), stored with that prompt's embeddings: Diff-Tuning trains bank slots with the null prompt
    whatever they hold, a DreamBooth-style prior with the class prompt they were drawn for."""
    table = embeddings(family, prompts)  # each prompt encoded once, in the precision it is stored in
    for first in range(indices.start, indices.stop, bank.batch_size):
        batch = range(first, min(first + bank.batch_size, indices.stop))
        starts = [sample_start(bank.seed, i, len(prompts), family.sample_shape) for i in batch]
        which = [k for k, _ in starts]
        embeds, pooled = (torch.from_numpy(part[which]).float() for part in table)
        noise = torch.stack([n for _, n in starts])
        x = family.sample(
            None, TextCondition(embeds, pooled), num_steps=bank.num_steps, guidance_scale=bank.guidance_scale,
            noise=noise, decode=False,
        )  # fmt: skip
        x = x.float().cpu().numpy()
        on_batch(len(batch))
        for position, i in enumerate(batch):
            k = which[position]
            meta = {"index": i, "seed": bank.seed, "prompt": prompts[k]}
            yield {"x": x[position], "prompt_embeds": table[0][k], "pooled_embeds": table[1][k], "meta": meta}
