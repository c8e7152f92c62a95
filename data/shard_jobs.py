"""A shard set written by many ranks at once, restartable shard by shard (DESIGN invariants 2, 3 and 5).

Shard j holds the fixed index range [j * per_shard, min((j + 1) * per_shard, N)) and rank r owns the shards
with j % world == r, so the set is the same whatever the number of ranks. After its shard, a rank writes a
sidecar `shard-XXXXXX.tar.json` (the ShardRecord); a shard counts as complete only when its sidecar exists
and the file's size and sha256 match it, so a rerun rebuilds exactly the missing, truncated or unrecorded
shards. `job.json`, written once, records the job's settings: a rerun with other settings is refused, so a
folder never mixes shards of two configurations. The manifest comes last, once every shard is complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.files import atomic_write_bytes, fsync_dir
from data.formats import FORMATS, ShardFormat
from data.shards import MANIFEST_NAME, ShardError, ShardRecord, write_manifest

JOB_NAME = "job.json"
SIDECAR_SUFFIX = ".json"


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on `keys` (e.g. (job seed, sample index)), never on a rank's stream."""
    return int(np.random.default_rng([int(k) for k in keys]).integers(2**63))


def shard_ranges(num_samples: int, per_shard: int) -> list[range]:
    if num_samples < 1 or per_shard < 1:
        raise ValueError(f"need at least one sample and one sample per shard, got {num_samples} and {per_shard}")
    return [range(first, min(first + per_shard, num_samples)) for first in range(0, num_samples, per_shard)]


def owned_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """Round-robin, so that every rank gets a similar share of the work (the last shard may be short)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return list(range(rank, num_shards, world))


WDS = FORMATS["wds"]


def sidecar_path(directory: str | Path, shard_id: int, fmt: ShardFormat = WDS) -> Path:
    return Path(directory) / (fmt.shard_name(shard_id) + SIDECAR_SUFFIX)


def read_sidecar(directory: str | Path, shard_id: int, fmt: ShardFormat = WDS) -> ShardRecord | None:
    """The shard's record, or None when the sidecar is missing or unreadable (the shard is then rebuilt)."""
    try:
        return ShardRecord(**json.loads(sidecar_path(directory, shard_id, fmt).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def is_complete(directory: str | Path, shard_id: int, indices: range | None = None, fmt: ShardFormat = WDS) -> bool:
    """True iff the sidecar exists, names this shard (and range) and the shard's size and sha256 match it."""
    record = read_sidecar(directory, shard_id, fmt)
    if record is None or record.name != fmt.shard_name(shard_id):
        return False
    if indices is not None and (record.first_index, record.num_samples) != (indices.start, len(indices)):
        return False
    try:
        return fmt.digest(Path(directory) / record.name) == (record.num_bytes, record.sha256)
    except (OSError, ShardError):
        return False


def remove_leftovers(directory: str | Path, name: str) -> None:
    """Deletes temporaries of `name` left by a killed writer (write_shard and atomic_write_bytes start them
    with `.<name>.`); call it only for files this process owns, as another rank may be writing its own."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}."):
            if (directory / entry).is_dir():  # an MDS shard is a directory
                shutil.rmtree(directory / entry, ignore_errors=True)
            else:
                (directory / entry).unlink(missing_ok=True)


def write_owned_shard(
    directory: str | Path,
    shard_id: int,
    samples: Iterable[dict],
    fields: dict[str, str],
    first_index: int,
    fmt: ShardFormat = WDS,
) -> ShardRecord:
    """(Re)writes one shard atomically, then its sidecar: a kill at any point leaves the shard incomplete."""
    directory = Path(directory)
    name = fmt.shard_name(shard_id)
    remove_leftovers(directory, name)
    remove_leftovers(directory, name + SIDECAR_SUFFIX)
    # The old sidecar goes first: a stale record must never vouch for a shard being rewritten.
    sidecar_path(directory, shard_id, fmt).unlink(missing_ok=True)
    record = fmt.write_shard(directory / name, samples, fields, first_index)
    atomic_write_bytes(sidecar_path(directory, shard_id, fmt), _json_bytes(asdict(record)))
    return record


def shards_to_build(
    directory: str | Path, ranges: list[range], rank: int, world: int, fmt: ShardFormat = WDS
) -> list[int]:
    """The shards of `rank` that are missing or incomplete. Also deletes temporaries a killed run left
    behind for any shard of this rank, complete or not: only this rank writes them."""
    owned = owned_shards(len(ranges), rank, world)
    for j in owned:
        remove_leftovers(directory, fmt.shard_name(j))
        remove_leftovers(directory, fmt.shard_name(j) + SIDECAR_SUFFIX)
    return [j for j in owned if not is_complete(directory, j, ranges[j], fmt)]


def incomplete_shards(directory: str | Path, num_samples: int, per_shard: int, fmt: ShardFormat = WDS) -> list[int]:
    ranges = shard_ranges(num_samples, per_shard)
    return [j for j, indices in enumerate(ranges) if not is_complete(directory, j, indices, fmt)]


def merge_manifest(
    directory: str | Path,
    num_samples: int,
    per_shard: int,
    fields: dict[str, str],
    meta: dict | None = None,
    fmt: ShardFormat = WDS,
) -> Path:
    """Writes manifest.json from the sidecars once every shard is complete; refuses (naming them) otherwise.
    The manifest records the format, so that readers open the set the way it was written."""
    directory = Path(directory)
    missing = incomplete_shards(directory, num_samples, per_shard, fmt)
    if missing:
        names = ", ".join(fmt.shard_name(j) for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardError(
            f"{directory}: {len(missing)} shard(s) are missing or incomplete ({names}); "
            "re-run the same job to build them, then the manifest is written"
        )
    remove_leftovers(directory, MANIFEST_NAME)
    records = [read_sidecar(directory, j, fmt) for j in range(len(shard_ranges(num_samples, per_shard)))]
    return write_manifest(directory, records, fields, {**(meta or {}), "format": fmt.name})


def claim_directory(directory: str | Path, job: dict, key: str = "the output folder") -> None:
    """Records `job` (the settings that decide the shards' bytes) in job.json, or checks it against the
    recorded one. Safe for many ranks at once: the file appears by an atomic link, so exactly one rank
    creates it and the others read the whole file. `key` names the setting in messages (e.g. data.bank)."""
    directory = Path(directory)
    job = json.loads(_json_bytes(job))  # tuples -> lists, so that a recorded job compares equal
    path = directory / JOB_NAME
    if not path.exists():
        entries = [entry for entry in os.listdir(directory) if not entry.startswith(".")] if directory.is_dir() else []
        # Listed before looking for job.json again: a rank that just claimed the folder wrote job.json
        # before any shard, so files seen while job.json is still absent were there before this job.
        if entries and not path.exists():
            raise ShardError(
                f"{key}={directory} already holds files but no {JOB_NAME}, so it was not written by this job: "
                "pick a new (or empty) folder; nothing in it was touched"
            )
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{JOB_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique across nodes too
        with open(tmp, "wb") as file:
            file.write(_json_bytes(job))
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)  # fails if another rank won the race: then compare with its (equal) record
            fsync_dir(directory)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} is unreadable ({err}): delete {directory} and re-run the job") from err
    if recorded != job:
        changes = [
            f"{name}: {recorded.get(name)!r} -> {job.get(name)!r}"
            for name in sorted(set(recorded) | set(job))
            if recorded.get(name) != job.get(name)
        ]
        raise ShardError(
            f"{key}={directory} was written by a job with other settings ({'; '.join(changes)}); "
            f"its shards would mix two configurations: pick a new folder, or delete {directory} to start over"
        )


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1) + "\n").encode("utf-8")
