"""The two shard formats behind one seam: webdataset tars (default) and mosaicml-streaming's MDS.

Writers pick a format by name (`data.format`); readers take it from the manifest, so a shard set is read
the way it was written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.composed import ComposedDataset, is_composed
from data.shards import ShardDataset, ShardRecord, file_sha256, read_manifest, shard_name, write_shard


@dataclass(frozen=True)
class ShardFormat:
    name: str
    shard_name: Callable[[int], str]
    write_shard: Callable[..., ShardRecord]  # (path, samples, fields, first_index) -> record
    digest: Callable[[Path], tuple[int, str]]  # (bytes, sha256) of a written shard, as its record has them
    dataset: Callable[..., object]  # (directory, verify) -> dataset served by global index


def _file_digest(path: Path) -> tuple[int, str]:
    return Path(path).stat().st_size, file_sha256(path)


def _mds(attribute: str):
    """MDS is imported only when used: importing mosaicml-streaming costs seconds."""

    def call(*args, **kwargs):
        import data.mds

        return getattr(data.mds, attribute)(*args, **kwargs)

    return call


def _read_only(*args, **kwargs):
    raise ValueError("a composed set is written by data.composed.write_composed over existing shard sets, not by a job")


FORMATS = {
    "wds": ShardFormat("wds", shard_name, write_shard, _file_digest, ShardDataset),
    "mds": ShardFormat(
        "mds", _mds("mds_shard_name"), _mds("write_mds_shard"), _mds("hash_mds_shard"), _mds("MDSDataset")
    ),
    # A manifest over parts of other shard sets (continual banks): read by global index, never written as shards.
    "composed": ShardFormat(
        "composed",
        _read_only,
        _read_only,
        _read_only,
        lambda path, verify: ComposedDataset(path, open_shard_set, verify),
    ),
}


def shard_format(name: str) -> ShardFormat:
    if name not in FORMATS:
        raise ValueError(f"data.format={name!r} is not one of {tuple(FORMATS)}")
    return FORMATS[name]


def open_shard_set(directory: str | Path, verify: str = "sha256"):
    """The dataset of a shard set, in the format its manifest records (webdataset when it says nothing)."""
    if is_composed(directory):
        return FORMATS["composed"].dataset(directory, verify=verify)
    return shard_format(read_manifest(directory).meta.get("format", "wds")).dataset(directory, verify=verify)
