"""Class-labelled data (DiT and its EDM and flow variants): ImageFolder images -> DiT's centre crop -> VAE latents (or
pixels), with labels; and banks of class-conditional samples of the pre-trained model.

Indices follow the sorted (class, path) order of the readable images, so they are stable across reruns and numbers
of ranks. A cheap validity pass, spread over the ranks, runs first: unreadable files get no index and are listed in
report.json instead of stopping the job halfway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data.files import atomic_write_bytes
from data.images import (
    ImageFolderListing,
    check_image,
    hflip,
    list_image_folder,
    load_images,
    parse_background,
    scan_images,
)
from data.shard_jobs import shard_ranges
from models.family import state_sha256
from trainer import distributed
from trainer.config import BankConfig, Config, PrepareConfig
from trainer.jobs.kinds import BankRecipe
from trainer.jobs.kinds.shared import (
    MAX_PRINTED,
    NUM_THREADS,
    REPORT_NAME,
    VIEWS,
    check_resolution,
    encode,
    sample_start,
)
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.setup import load_family

BANK_FIELDS = {"x": "npy", "label": "cls", "meta": "json"}


class LabelledImages:
    name = "labels"

    def prepare(self, cfg: Config, rank: int, world: int, device: torch.device) -> Path:
        return prepare_image_folder(cfg, rank, world, device)

    def bank_recipe(self, cfg: Config, family, device: torch.device) -> BankRecipe:
        denoiser = family.denoiser.to(device).eval()
        settings = {
            "weights_sha256": state_sha256(family.denoiser), "num_classes": family.null_condition,
            "clip_sample": family.sampling_scheduler().config.get("clip_sample"),  # EDM's sampler has no x0 clip
            "original_timestep_frequencies": family.original_timestep_frequencies,
        }  # fmt: skip
        samples = lambda indices, on_batch: bank_samples(family, denoiser, indices, cfg.bank, on_batch)  # noqa: E731
        return BankRecipe(BANK_FIELDS, settings, samples)


KIND = LabelledImages()


# --- target data --------------------------------------------------------------------------------------------------
def prepare_image_folder(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    prepare, directory = cfg.prepare, Path(cfg.data.target)
    listing = list_image_folder(prepare.images)  # every rank lists the same folder: all fail alike
    family = load_family(cfg, num_classes=0)
    check_resolution(family, prepare.resolution)
    job = {
        "kind": "target",
        "files_sha256": listing_sha256(listing),
        "classes": listing.classes,
        "encoder_sha256": family.frozen_fingerprint(),
        "sample_shape": list(family.sample_shape),
        **{key: getattr(prepare, key) for key in ("resolution", "samples_per_shard", "batch_size", "hflip", "seed")},
        "background": list(parse_background(prepare.background)),  # "white" and "255,255,255" are one setting
        "format": cfg.data.format,
    }
    shard_job = ShardJob(directory, job, "data.target", **shard_job_settings(cfg, rank, world, device))
    family.place_frozen(device)

    if rank == 0:
        print(f"prepare: checking {len(listing.files)} images in {listing.root} on {world} rank(s)", flush=True)
    bad, transparent = scan_files(listing, rank, world, device)
    bad_set = set(bad)
    files = [item for k, item in enumerate(listing.files) if k not in bad_set]
    if not files:
        raise ValueError(f"prepare.images={listing.root}: none of its {len(listing.files)} images can be read")
    fields = target_fields(prepare.hflip)
    num_shards = len(shard_ranges(len(files), prepare.samples_per_shard))
    meta = {"kind": "target", "classes": listing.classes, "source": str(listing.root.resolve()), **job}
    shard_job.run(
        len(files), prepare.samples_per_shard, fields,
        lambda indices, on_batch: target_samples(family, listing, files, indices, prepare, on_batch), meta,
        finish=lambda: write_report(directory, listing, files, bad, num_shards, transparent, job["background"]),
        progress="prepare", unit="image",
    )  # fmt: skip
    return directory


def target_fields(hflip_views: bool) -> dict[str, str]:
    return {"x": "npy", **({"x_flip": "npy"} if hflip_views else {}), "label": "cls", "meta": "json"}


def target_samples(
    family,
    listing: ImageFolderListing,
    files: list[tuple[str, int]],
    indices: range,
    prepare: PrepareConfig,
    on_batch: Callable[[int], None],
) -> Iterator[dict]:
    """The samples of one shard, in batches of prepare.batch_size aligned to the shard's first index."""
    background = parse_background(prepare.background)
    for first in range(indices.start, indices.stop, prepare.batch_size):
        batch = range(first, min(first + prepare.batch_size, indices.stop))
        paths = [listing.root / files[i][0] for i in batch]
        images = load_images(paths, prepare.resolution, NUM_THREADS, background)
        # A flip in latent space is not the latent of the flipped image: the flipped image is encoded too.
        views = {"x": images, "x_flip": hflip(images)} if prepare.hflip else {"x": images}
        encoded = {name: encode(family, view, prepare.seed, batch, VIEWS[name]) for name, view in views.items()}
        on_batch(len(batch))
        for position, i in enumerate(batch):
            path, label = files[i]
            yield {
                **{name: x[position] for name, x in encoded.items()},
                "label": label,
                "meta": {"index": i, "path": path},
            }


def scan_files(listing: ImageFolderListing, rank: int, world: int, device: torch.device) -> tuple[list[int], list[int]]:
    """Positions in listing.files that fail check_image, and those of readable images with transparent pixels
    (composited onto prepare.background); each rank checks a slice, a sum gathers them."""
    mine = list(range(rank, len(listing.files), world))
    results = scan_images([listing.root / listing.files[k][0] for k in mine], NUM_THREADS)
    status = torch.zeros(len(listing.files), dtype=torch.int32)  # 1: unreadable, 2: transparent
    for k, (error, transparent) in zip(mine, results):
        status[k] = 1 if error else 2 if transparent else 0
    status = distributed.all_reduce_sum(status.to(device)).cpu()
    return (status == 1).nonzero().flatten().tolist(), (status == 2).nonzero().flatten().tolist()


def listing_sha256(listing: ImageFolderListing) -> str:
    """Fingerprint of the input files: names, labels and sizes (an added or replaced file changes the indices)."""
    digest = hashlib.sha256()
    for path, label in listing.files:
        digest.update(f"{label}\t{path}\t{(listing.root / path).stat().st_size}\n".encode())
    return digest.hexdigest()


def write_report(
    directory: Path, listing: ImageFolderListing, files: list[tuple[str, int]], bad: list[int], num_shards: int,
    transparent: list[int], background: list[int],
) -> None:  # fmt: skip
    """report.json and a printed summary: what was written, every unreadable file with the reason, and every image
    whose transparent pixels were composited onto the background."""
    unreadable = [{"path": listing.files[k][0], "error": check_image(listing.root / listing.files[k][0])} for k in bad]
    counts = np.bincount([label for _, label in files], minlength=len(listing.classes)).tolist()
    report = {
        "source": str(listing.root.resolve()),
        "num_images": len(files),
        "num_shards": num_shards,
        "images_per_class": dict(zip(listing.classes, counts)),
        "num_unreadable": len(unreadable),
        "unreadable": unreadable,
        "ignored": listing.ignored,
        "num_transparent": len(transparent),
        "background": background,
        "transparent": [listing.files[k][0] for k in transparent],
    }
    atomic_write_bytes(directory / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    lines = [
        f"prepare: {len(files)} images of {len(listing.classes)} classes written to {directory} "
        f"({num_shards} shards); {len(unreadable)} unreadable images skipped"
    ]
    lines += [f"  unreadable: {item['path']} ({item['error']})" for item in unreadable[:MAX_PRINTED]]
    if len(unreadable) > MAX_PRINTED:
        lines.append(f"  ... and {len(unreadable) - MAX_PRINTED} more")
    if listing.ignored:
        lines.append(f"  {len(listing.ignored)} files without an image extension ignored")
    if transparent:
        lines.append(
            f"  {len(transparent)} images with transparent pixels composited onto RGB {tuple(background)} "
            "(prepare.background)"
        )
    lines.append(f"  full report: {directory / REPORT_NAME}")
    print("\n".join(lines), flush=True)


# --- the bank -----------------------------------------------------------------------------------------------------
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
