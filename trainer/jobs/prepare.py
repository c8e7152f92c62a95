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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data.files import atomic_write_bytes
from data.images import (
    CaptionListing,
    ImageFolderListing,
    check_control,
    check_image,
    hflip,
    list_caption_folder,
    list_image_folder,
    load_image_and_control,
    load_images,
    parse_background,
    scan_images,
)
from data.shard_jobs import derived_seed, shard_ranges
from models.annotators import annotator_for, as_control
from trainer import distributed
from trainer.config import Config, ConfigError, PrepareConfig
from trainer.jobs.shard_job import ShardJob, shard_job_settings
from trainer.setup import load_family

REPORT_NAME = "report.json"
CONTROLNET_FIELDS = {"x": "npy", "tokens": "npy", "control": "png", "meta": "json"}
VIEWS = {"x": 0, "x_flip": 1}  # the view number enters the latent's seed
NUM_THREADS = min(8, os.cpu_count() or 1)
MAX_PRINTED = 20  # unreadable paths printed in the summary; report.json lists them all


def target_fields(hflip_views: bool) -> dict[str, str]:
    return {"x": "npy", **({"x_flip": "npy"} if hflip_views else {}), "label": "cls", "meta": "json"}


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


def prepare_data(cfg: Config) -> Path:
    """Writes cfg.prepare.images as shards into cfg.data.target; returns the folder."""
    for key in ("resolution", "samples_per_shard", "batch_size"):
        if getattr(cfg.prepare, key) < 1:
            raise ConfigError(f"prepare.{key}={getattr(cfg.prepare, key)} must be at least 1")
    if cfg.prepare.seed < 0:
        raise ConfigError(f"prepare.seed={cfg.prepare.seed} must be >= 0")
    rank, world, device = distributed.init()
    if cfg.model.family == "sd_controlnet":
        return _prepare_controlnet_data(cfg, rank, world, device)
    return _prepare_data(cfg, rank, world, device)


def _prepare_data(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
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


# --- ControlNet data: (image, caption, control) triples -----------------------------------------------------------
def _prepare_controlnet_data(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
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
    entries = [entry for k, entry in enumerate(listing.entries) if status[k] == 0]
    if not entries:
        raise ValueError(f"prepare.images={listing.root}: none of its {len(listing.entries)} samples can be read")
    num_shards = len(shard_ranges(len(entries), prepare.samples_per_shard))

    def report() -> None:
        bad = [
            {"path": e["image"], "error": entry_problem(listing.root, e)}
            for e, code in zip(listing.entries, status)
            if code
        ]
        annotated = sum(entry["control"] is None for entry in entries)
        write_caption_report(directory, listing, len(entries), bad, num_shards, annotated)

    shard_job.run(
        len(entries), prepare.samples_per_shard, CONTROLNET_FIELDS,
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


def entry_problem(root: Path, entry: dict) -> str | None:
    """Why an entry cannot be used: an unreadable image or control map, or a control map that does not fit."""
    for key in ("image", "control"):
        if entry[key] is not None and (error := check_image(root / entry[key])):
            return f"{key} {entry[key]}: {error}"
    return None if entry["control"] is None else check_control(root / entry["image"], root / entry["control"])


def entry_status(listing: CaptionListing, rank: int, world: int, device: torch.device) -> list[int]:
    """0 usable, 1 unreadable (skipped and reported), 2 a control map that does not fit (an error), per entry;
    each rank checks a slice, a sum gathers them."""
    mine = list(range(rank, len(listing.entries), world))
    with ThreadPoolExecutor(max_workers=NUM_THREADS) as pool:
        problems = list(pool.map(lambda k: entry_problem(listing.root, listing.entries[k]), mine))
    status = torch.zeros(len(listing.entries), dtype=torch.int32)
    for k, problem in zip(mine, problems):
        status[k] = 0 if problem is None else 2 if problem.startswith("its control map") else 1
    return distributed.all_reduce_sum(status.to(device)).cpu().tolist()


def caption_listing_sha256(listing: CaptionListing) -> str:
    """Fingerprint of the inputs: the index's bytes and every listed file's size."""
    digest = hashlib.sha256(listing.index.read_bytes())
    for entry in listing.entries:
        for key in ("image", "control"):
            path = entry[key] and listing.root / entry[key]
            digest.update(f"{key}\t{entry[key]}\t{path.stat().st_size if path and path.exists() else -1}\n".encode())
    return digest.hexdigest()


def write_caption_report(
    directory: Path, listing: CaptionListing, num_written: int, bad: list[dict], num_shards: int, num_annotated: int
) -> None:
    """report.json and a printed summary, as for image folders: what was written, and every unreadable entry."""
    report = {
        "source": str(listing.root.resolve()), "num_images": num_written, "num_shards": num_shards,
        "num_annotated": num_annotated, "num_unreadable": len(bad), "unreadable": bad,
    }  # fmt: skip
    atomic_write_bytes(directory / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    lines = [f"prepare: {num_written} image-caption-control samples written to {directory} ({num_shards} shards); "
             f"{len(bad)} unreadable samples skipped"]  # fmt: skip
    lines += [f"  unreadable: {item['path']} ({item['error']})" for item in bad[:MAX_PRINTED]]
    if len(bad) > MAX_PRINTED:
        lines.append(f"  ... and {len(bad) - MAX_PRINTED} more")
    lines.append(f"  full report: {directory / REPORT_NAME}")
    print("\n".join(lines), flush=True)
