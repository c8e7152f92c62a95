"""Caption folders (index.jsonl of image, caption and optional control), as the ControlNet and text kinds read them:
which entries can be used, and the fingerprint of the inputs."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from data.files import atomic_write_bytes
from data.images import CaptionListing, check_control, check_image
from trainer import distributed
from trainer.jobs.kinds.shared import MAX_PRINTED, NUM_THREADS, REPORT_NAME


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
    directory: Path, listing: CaptionListing, num_written: int, bad: list[dict], num_shards: int, num_annotated: int,
    samples: str = "image-caption-control",
) -> None:  # fmt: skip
    """report.json and a printed summary, as for image folders: what was written (`samples`: what one sample holds),
    and every unreadable entry."""
    report = {
        "source": str(listing.root.resolve()), "num_images": num_written, "num_shards": num_shards,
        "num_annotated": num_annotated, "num_unreadable": len(bad), "unreadable": bad,
    }  # fmt: skip
    atomic_write_bytes(directory / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    lines = [f"prepare: {num_written} {samples} samples written to {directory} ({num_shards} shards); "
             f"{len(bad)} unreadable samples skipped"]  # fmt: skip
    lines += [f"  unreadable: {item['path']} ({item['error']})" for item in bad[:MAX_PRINTED]]
    if len(bad) > MAX_PRINTED:
        lines.append(f"  ... and {len(bad) - MAX_PRINTED} more")
    lines.append(f"  full report: {directory / REPORT_NAME}")
    print("\n".join(lines), flush=True)


def usable_entries(listing: CaptionListing, status: list[int]) -> list[dict]:
    """The entries `entry_status` found usable, in the index's order (their positions are the sample indices)."""
    entries = [entry for k, entry in enumerate(listing.entries) if status[k] == 0]
    if not entries:
        raise ValueError(f"prepare.images={listing.root}: none of its {len(listing.entries)} samples can be read")
    return entries


def unreadable_entries(listing: CaptionListing, status: list[int]) -> list[dict]:
    """{"path", "error"} of every entry that was skipped, for the report."""
    return [
        {"path": entry["image"], "error": entry_problem(listing.root, entry)}
        for entry, code in zip(listing.entries, status)
        if code
    ]
