"""Target data into shards: ImageFolder images -> DiT's centre crop -> VAE latents (or pixels), with labels.

Indices follow the sorted (class, path) order of the readable images, so they are stable across reruns
and numbers of ranks. A cheap validity pass, spread over the ranks, runs first: unreadable files get no
index and are listed in report.json instead of stopping the job halfway. Each rank then writes the shards
it owns with the same restartable machinery as the memory bank (data/shard_jobs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.files import atomic_write_bytes
from data.formats import shard_format
from data.images import ImageFolderListing, check_image, find_unreadable, hflip, list_image_folder, load_images
from data.shard_jobs import (
    claim_directory,
    derived_seed,
    merge_manifest,
    shard_ranges,
    shards_to_build,
    write_owned_shard,
)
from data.shards import ShardError
from models import family_class
from trainer import distributed
from trainer.config import Config, ConfigError, PrepareConfig
from trainer.generate import state_sha256

REPORT_NAME = "report.json"
VIEWS = {"x": 0, "x_flip": 1}  # the view number enters the latent's seed
NUM_THREADS = min(8, os.cpu_count() or 1)
MAX_PRINTED = 20  # unreadable paths printed in the summary; report.json lists them all


def target_fields(hflip_views: bool) -> dict[str, str]:
    return {"x": "npy", **({"x_flip": "npy"} if hflip_views else {}), "label": "cls", "meta": "json"}


def check_resolution(family, resolution: int) -> None:
    """The encoded image must have the denoiser's input shape; say which resolution would fit."""
    if family.vae is None:
        factor, channels = 1, 3
    else:
        factor, channels = 2 ** (len(family.vae.config.block_out_channels) - 1), family.vae.config.latent_channels
    got = (channels, resolution // factor, resolution // factor)
    if resolution % factor or got != tuple(family.sample_shape):
        raise ConfigError(
            f"prepare.resolution={resolution} gives {'latents' if family.vae else 'images'} of shape {got}, but the "
            f"model expects {tuple(family.sample_shape)}: set prepare.resolution={family.sample_shape[-1] * factor}"
        )


def encode(family, images: np.ndarray, seed: int, indices: range, view: int, device: torch.device) -> np.ndarray:
    """Model-space x of a batch of images in [-1, 1].

    With a VAE we store ONE posterior sample per view, drawn from a generator seeded by (seed, index, view):
    it is reproducible whatever the batching or number of ranks, takes half the storage of mean + std, and is
    what DiT-style training sees anyway (a sample of the posterior, not its mean)."""
    if family.vae is None:
        return images.astype(np.float32)
    x = torch.from_numpy(images).to(device, next(family.vae.parameters()).dtype)
    generators = [torch.Generator().manual_seed(derived_seed(seed, i, view)) for i in indices]
    with torch.no_grad():
        latents = family.vae.encode(x).latent_dist.sample(generator=generators) * family.vae.config.scaling_factor
    return latents.float().cpu().numpy()


def target_samples(
    family,
    listing: ImageFolderListing,
    files: list[tuple[str, int]],
    indices: range,
    prepare: PrepareConfig,
    device: torch.device,
    on_batch: Callable[[int], None],
) -> Iterator[dict]:
    """The samples of one shard, in batches of prepare.batch_size aligned to the shard's first index."""
    for first in range(indices.start, indices.stop, prepare.batch_size):
        batch = range(first, min(first + prepare.batch_size, indices.stop))
        images = load_images([listing.root / files[i][0] for i in batch], prepare.resolution, NUM_THREADS)
        # A flip in latent space is not the latent of the flipped image: the flipped image is encoded too.
        views = {"x": images, "x_flip": hflip(images)} if prepare.hflip else {"x": images}
        encoded = {name: encode(family, view, prepare.seed, batch, VIEWS[name], device) for name, view in views.items()}
        on_batch(len(batch))
        for position, i in enumerate(batch):
            path, label = files[i]
            yield {
                **{name: x[position] for name, x in encoded.items()},
                "label": label,
                "meta": {"index": i, "path": path},
            }


def unreadable_files(listing: ImageFolderListing, rank: int, world: int, device: torch.device) -> list[int]:
    """Positions in listing.files that fail check_image; each rank checks a slice, a sum gathers them."""
    mine = list(range(rank, len(listing.files), world))
    results = find_unreadable([listing.root / listing.files[k][0] for k in mine], NUM_THREADS)
    bad = torch.zeros(len(listing.files), dtype=torch.int32)
    bad[[k for k, error in zip(mine, results) if error]] = 1
    return distributed.all_reduce_sum(bad.to(device)).nonzero().flatten().tolist()


def listing_sha256(listing: ImageFolderListing) -> str:
    """Fingerprint of the input files: names, labels and sizes (an added or replaced file changes the indices)."""
    digest = hashlib.sha256()
    for path, label in listing.files:
        digest.update(f"{label}\t{path}\t{(listing.root / path).stat().st_size}\n".encode())
    return digest.hexdigest()


def prepare_data(cfg: Config) -> Path:
    """Writes cfg.prepare.images as shards into cfg.data.target; returns the folder."""
    for key in ("resolution", "samples_per_shard", "batch_size"):
        if getattr(cfg.prepare, key) < 1:
            raise ConfigError(f"prepare.{key}={getattr(cfg.prepare, key)} must be at least 1")
    if cfg.prepare.seed < 0:
        raise ConfigError(f"prepare.seed={cfg.prepare.seed} must be >= 0")
    rank, world, device = distributed.init()
    return _prepare_data(cfg, rank, world, device)


def _prepare_data(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    prepare, directory = cfg.prepare, Path(cfg.data.target)
    listing = list_image_folder(prepare.images)  # every rank lists the same folder: all fail alike
    family = family_class(cfg.model.family).from_pretrained(
        cfg.model.pretrained, vae=cfg.model.vae, num_classes=0, num_attention_heads=cfg.model.num_attention_heads
    )
    check_resolution(family, prepare.resolution)
    job = {
        "kind": "target",
        "files_sha256": listing_sha256(listing),
        "classes": listing.classes,
        "encoder_sha256": None if family.vae is None else state_sha256(family.vae),
        "sample_shape": list(family.sample_shape),
        **{key: getattr(prepare, key) for key in ("resolution", "samples_per_shard", "batch_size", "hflip", "seed")},
        "format": cfg.data.format,
    }
    claim_directory(directory, job, "data.target")
    if family.vae is not None:
        family.vae.to(device)

    if rank == 0:
        print(f"prepare: checking {len(listing.files)} images in {listing.root} on {world} rank(s)", flush=True)
    bad = unreadable_files(listing, rank, world, device)
    bad_set = set(bad)
    files = [item for k, item in enumerate(listing.files) if k not in bad_set]
    if not files:
        raise ValueError(f"prepare.images={listing.root}: none of its {len(listing.files)} images can be read")
    fields = target_fields(prepare.hflip)
    ranges = shard_ranges(len(files), prepare.samples_per_shard)
    fmt = shard_format(cfg.data.format)
    todo = shards_to_build(directory, ranges, rank, world, fmt)
    total = sum(len(ranges[j]) for j in todo)
    bar = tqdm(total=total, desc=f"prepare (rank 0 of {world})", unit="image", disable=rank != 0, dynamic_ncols=True)
    for j in todo:
        samples = target_samples(family, listing, files, ranges[j], prepare, device, bar.update)
        write_owned_shard(directory, j, samples, fields, ranges[j].start, fmt)
    bar.close()
    distributed.barrier()

    error = None
    if rank == 0:
        try:
            meta = {"kind": "target", "classes": listing.classes, "source": str(listing.root.resolve()), **job}
            merge_manifest(directory, len(files), prepare.samples_per_shard, fields, meta, fmt)
            write_report(directory, listing, files, bad, len(ranges))
        except ShardError as err:
            error = err
    if distributed.any_rank(error is not None, device):
        raise error or ShardError(f"rank 0 could not write the manifest of {directory}: see its message")
    return directory


def write_report(
    directory: Path, listing: ImageFolderListing, files: list[tuple[str, int]], bad: list[int], num_shards: int
) -> None:
    """report.json and a printed summary: what was written, and every unreadable file with the reason."""
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
    lines.append(f"  full report: {directory / REPORT_NAME}")
    print("\n".join(lines), flush=True)
