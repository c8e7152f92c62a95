"""ControlNet data (SD + ControlNet): (image, caption, control) triples -> latents, caption tokens and 3-channel
control maps (given, or annotated at the training resolution); and banks of Stable Diffusion's own free samples with
their controls annotated from the decoded images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data.images import (
    CaptionListing,
    check_control,
    list_caption_folder,
    load_image_and_control,
    parse_background,
)
from data.shard_jobs import shard_ranges
from models.annotators import annotate_batch, annotator_for, as_control, to_uint8
from trainer.config import BankConfig, Config, ConfigError
from trainer.jobs.kinds import BankRecipe
from trainer.jobs.kinds.captions import (
    caption_listing_sha256,
    entry_status,
    unreadable_entries,
    usable_entries,
    write_caption_report,
)
from trainer.jobs.kinds.shared import (
    VIEWS,
    check_resolution,
    encode,
    sample_start,
)
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.setup import load_family

FIELDS = {"x": "npy", "tokens": "npy", "control": "png", "meta": "json"}  # of the target data and the bank alike


class ControlNetTriples:
    name = "controlnet"

    def prepare(self, cfg: Config, rank: int, world: int, device: torch.device) -> Path:
        return prepare_caption_folder(cfg, rank, world, device)

    def bank_recipe(self, cfg: Config, family, device: torch.device) -> BankRecipe:
        bank, m = cfg.bank, cfg.model.sd_controlnet
        annotate = annotator_for(m.control, m.annotator, tuple(m.canny_thresholds))
        if annotate is None:
            raise ConfigError(
                f"model.sd_controlnet.control={m.control}: the bank's controls are annotated from its generated "
                f"images and {m.control} has no built-in annotator: set "
                "model.sd_controlnet.annotator=path/to/module.py[:function]"
            )
        family.place_frozen(device)
        prompts = list(bank.prompts) or [m.default_prompt]
        settings = {
            "weights_sha256": family.frozen_fingerprint(), "control": m.control, "annotator": m.annotator,
            "canny_thresholds": list(m.canny_thresholds), "prompts": prompts,
            "null_tokens": family.null_tokens.tolist(),
        }  # fmt: skip
        samples = lambda indices, on_batch: bank_samples(family, annotate, prompts, indices, bank, on_batch)  # noqa: E731
        return BankRecipe(FIELDS, settings, samples)


KIND = ControlNetTriples()


# --- target data --------------------------------------------------------------------------------------------------
def prepare_caption_folder(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    """Writes latents, caption tokens and 3-channel control maps (given, or annotated at the training resolution).
    No flipped views: a flipped image needs its flipped control, and captions may say left or right."""
    prepare, directory, sd = cfg.prepare, Path(cfg.data.target), cfg.model.sd_controlnet
    if prepare.hflip:
        raise ConfigError("prepare.hflip=true: ControlNet data is not flipped (the control and caption would not "
                          "follow); set prepare.hflip=false (the sd15 presets do)")  # fmt: skip
    listing = list_caption_folder(prepare.images)
    annotate = annotator_for(sd.control, sd.annotator, tuple(sd.canny_thresholds))
    unannotated = [entry["image"] for entry in listing.entries if entry["control"] is None]
    if unannotated and annotate is None:
        raise ValueError(
            f"{listing.index}: sample {unannotated[0]} ({len(unannotated)} in all) has no control map and "
            f"model.sd_controlnet.control={sd.control} has no built-in annotator: give a "
            '"control" on every line, or set model.sd_controlnet.annotator=path/to/module.py[:function]'
        )
    family = load_family(cfg)
    check_resolution(family, prepare.resolution)
    # Checked before the folder is claimed: a fixed input then reruns without a settings mismatch.
    status = entry_status(listing, rank, world, device)
    misfit = [k for k, code in enumerate(status) if code == 2]
    if misfit:
        entry = listing.entries[misfit[0]]
        why = check_control(listing.root / entry["image"], listing.root / entry["control"])
        raise ValueError(f"{listing.index}: sample {entry['image']} ({len(misfit)} misfit in all): {why}")
    job = {
        "kind": "target", "files_sha256": caption_listing_sha256(listing), "control": sd.control,
        "annotator": sd.annotator, "canny_thresholds": list(sd.canny_thresholds),
        "encoder_sha256": family.frozen_fingerprint(), "null_tokens": family.null_tokens.tolist(),
        "sample_shape": list(family.sample_shape),
        **{key: getattr(prepare, key) for key in ("resolution", "samples_per_shard", "batch_size", "seed")},
        "background": list(parse_background(prepare.background)), "format": cfg.data.format,
    }  # fmt: skip
    shard_job = ShardJob(directory, job, "data.target", **shard_job_settings(cfg, rank, world, device))
    family.place_frozen(device)
    entries = usable_entries(listing, status)
    num_shards = len(shard_ranges(len(entries), prepare.samples_per_shard))

    def report() -> None:
        bad = unreadable_entries(listing, status)
        annotated = sum(entry["control"] is None for entry in entries)
        write_caption_report(directory, listing, len(entries), bad, num_shards, annotated)

    shard_job.run(
        len(entries), prepare.samples_per_shard, FIELDS,
        lambda indices, on_batch: controlnet_samples(family, annotate, listing, entries, indices, cfg, on_batch),
        {"source": str(listing.root.resolve()), **job}, finish=report, progress="prepare", unit="image",
    )  # fmt: skip
    return directory


def controlnet_samples(
    family, annotate, listing: CaptionListing, entries: list[dict], indices: range, cfg: Config,
    on_batch: Callable[[int], None],
) -> Iterator[dict]:  # fmt: skip
    """The samples of one shard, in batches of prepare.batch_size aligned to the shard's first index."""
    prepare = cfg.prepare
    nearest = cfg.model.sd_controlnet.control == "seg"  # segmentation values are labels: never blend them
    background = parse_background(prepare.background)
    for first in range(indices.start, indices.stop, prepare.batch_size):
        batch = [entries[i] for i in range(first, min(first + prepare.batch_size, indices.stop))]
        pairs = [
            load_image_and_control(listing.root / e["image"], e["control"] and listing.root / e["control"],
                                   prepare.resolution, nearest, background)
            for e in batch
        ]  # fmt: skip
        images = np.stack([image for image, _ in pairs])
        controls = [fitted_control(annotate, image, control, e["image"]) for (image, control), e in zip(pairs, batch)]
        pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        latents = encode(family, pixels, prepare.seed, range(first, first + len(batch)), VIEWS["x"])
        tokens = family.tokenize([e["caption"] for e in batch]).numpy().astype(np.int32)
        on_batch(len(batch))
        for position, entry in enumerate(batch):
            meta = {"index": first + position, "image": entry["image"], "caption": entry["caption"]}
            yield {"x": latents[position], "tokens": tokens[position], "control": controls[position], "meta": meta}


def fitted_control(annotate, image: np.ndarray, control: np.ndarray | None, name: str) -> np.ndarray:
    """The given control map, or the annotator's, as uint8 (H, W, 3) at the image's size; an error names the sample."""
    return as_control(annotate(image) if control is None else control, image.shape[:2], f"sample {name}")


# --- the bank -----------------------------------------------------------------------------------------------------
def bank_samples(
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
