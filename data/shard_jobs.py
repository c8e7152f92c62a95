"""A shard set written by many ranks at once, restartable shard by shard (DESIGN invariants 2, 3 and 5).

Shard j holds the fixed index range [j * per_shard, min((j + 1) * per_shard, N)) and rank r owns the shards
with j % world == r, so the set is the same whatever the number of ranks. After its shard, a rank writes a
sidecar `shard-XXXXXX.tar.json` (the ShardRecord); a shard counts as complete only when its sidecar exists
and the file's size and sha256 match it, so a rerun rebuilds exactly the missing, truncated or unrecorded
shards. `job.json`, written once, records the job's settings: a rerun with other settings is refused, so a
folder never mixes shards of two configurations. The manifest comes last, once every shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.files import atomic_write_bytes, fsync_dir
from data.shards import MANIFEST_NAME, ShardError, ShardRecord, shard_name, write_manifest, write_shard

JOB_NAME = "job.json"
SIDECAR_SUFFIX = ".json"


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on `keys` (e.g. (job seed, sample index)), never on a rank's stream."""
    return int(np.random.default_rng([int(k) for k in keys]).integers(2**63))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_ranges(num_samples: int, per_shard: int) -> list[range]:
    if num_samples < 1 or per_shard < 1:
        raise ValueError(f"need at least one sample and one sample per shard, got {num_samples} and {per_shard}")
    return [range(first, min(first + per_shard, num_samples)) for first in range(0, num_samples, per_shard)]


def owned_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """Round-robin, so that every rank gets a similar share of the work (the last shard may be short)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return list(range(rank, num_shards, world))


def sidecar_path(directory: str | Path, shard_id: int) -> Path:
    return Path(directory) / (shard_name(shard_id) + SIDECAR_SUFFIX)


def read_sidecar(directory: str | Path, shard_id: int) -> ShardRecord | None:
    """The shard's record, or None when the sidecar is missing or unreadable (the shard is then rebuilt)."""
    try:
        return ShardRecord(**json.loads(sidecar_path(directory, shard_id).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def is_complete(directory: str | Path, shard_id: int, indices: range | None = None) -> bool:
    """True iff the sidecar exists, names this shard (and range) and the file's size and sha256 match it."""
    record = read_sidecar(directory, shard_id)
    if record is None or record.name != shard_name(shard_id):
        return False
    if indices is not None and (record.first_index, record.num_samples) != (indices.start, len(indices)):
        return False
    path = Path(directory) / record.name
    try:
        if path.stat().st_size != record.num_bytes:
            return False
    except OSError:
        return False
    return file_sha256(path) == record.sha256


def remove_leftovers(directory: str | Path, name: str) -> None:
    """Deletes temporaries of `name` left by a killed writer (write_shard and atomic_write_bytes start them
    with `.<name>.`); call it only for files this process owns, as another rank may be writing its own."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}."):
            (directory / entry).unlink(missing_ok=True)


def write_owned_shard(
    directory: str | Path, shard_id: int, samples: Iterable[dict], fields: dict[str, str], first_index: int
) -> ShardRecord:
    """(Re)writes one shard atomically, then its sidecar: a kill at any point leaves the shard incomplete."""
    directory = Path(directory)
    name = shard_name(shard_id)
    remove_leftovers(directory, name)
    remove_leftovers(directory, name + SIDECAR_SUFFIX)
    # The old sidecar goes first: a stale record must never vouch for a shard being rewritten.
    sidecar_path(directory, shard_id).unlink(missing_ok=True)
    record = write_shard(directory / name, samples, fields, first_index)
    atomic_write_bytes(sidecar_path(directory, shard_id), _json_bytes(asdict(record)))
    return record


def incomplete_shards(directory: str | Path, num_samples: int, per_shard: int) -> list[int]:
    ranges = shard_ranges(num_samples, per_shard)
    return [j for j, indices in enumerate(ranges) if not is_complete(directory, j, indices)]


def merge_manifest(
    directory: str | Path, num_samples: int, per_shard: int, fields: dict[str, str], meta: dict | None = None
) -> Path:
    """Writes manifest.json from the sidecars once every shard is complete; refuses (naming them) otherwise."""
    directory = Path(directory)
    missing = incomplete_shards(directory, num_samples, per_shard)
    if missing:
        names = ", ".join(shard_name(j) for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardError(
            f"{directory}: {len(missing)} shard(s) are missing or incomplete ({names}); "
            "re-run the same job to build them, then the manifest is written"
        )
    remove_leftovers(directory, MANIFEST_NAME)
    records = [read_sidecar(directory, j) for j in range(len(shard_ranges(num_samples, per_shard)))]
    return write_manifest(directory, records, fields, meta)


def claim_directory(directory: str | Path, job: dict, key: str = "the output folder") -> None:
    """Records `job` (the settings that decide the shards' bytes) in job.json, or checks it against the
    recorded one. Safe for many ranks at once: the file appears by an atomic link, so exactly one rank
    creates it and the others read the whole file. `key` names the setting in messages (e.g. data.bank)."""
    directory = Path(directory)
    job = json.loads(_json_bytes(job))  # tuples -> lists, so that a recorded job compares equal
    path = directory / JOB_NAME
    if not path.exists():
        if directory.is_dir() and any(not entry.startswith(".") for entry in os.listdir(directory)):
            raise ShardError(
                f"{key}={directory} already holds files but no {JOB_NAME}, so it was not written by this job: "
                "pick a new (or empty) folder; nothing in it was touched"
            )
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{JOB_NAME}.{os.getpid()}.tmp"
        tmp.write_bytes(_json_bytes(job))
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
