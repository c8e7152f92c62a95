"""Webdataset tar shards with a manifest, readable by global sample index.

``manifest.json`` lists every shard with its index range, byte size and sha256, so a reader refuses a
half-written or corrupt set at start-up (DESIGN invariants 3 and 5). Each field of a sample is one tar
member ``<key>.<field>.<ext>`` whose key is the zero-padded global index (webdataset's key convention).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import operator
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from PIL import Image

from data.files import atomic_write

FIELD_EXTENSIONS = ("npy", "cls", "txt", "json", "png")  # the only encodings supported
MANIFEST_NAME = "manifest.json"
_FORMAT, _VERSION = "difftune-shards", 1
_VERIFY_MODES = ("sha256", "size", "none")
# A field name is part of member names: no "." (it separates key, field and extension) and no leading
# "_" (TarWriter silently drops such entries as metadata).
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HASH_CHUNK_BYTES = 1 << 20
_MAX_OPEN_FILES = 128  # a bank may have thousands of shards; stay well below the usual ulimit of 1024
_REWRITE_HINT = "re-run the job that wrote it (launch/prepare_data.py or launch/generate_bank.py)"


class ShardError(Exception):
    """A shard set is missing, inconsistent or corrupt; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardRecord:
    """One manifest entry: a shard file and the global index range it holds."""

    name: str  # file name relative to the shard directory
    first_index: int
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    fields: dict[str, str]  # field name -> extension
    shards: list[ShardRecord]  # ordered by first_index, contiguous from 0
    meta: dict

    @property
    def num_samples(self) -> int:
        return sum(record.num_samples for record in self.shards)


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def _sample_key(index: int) -> str:
    return f"{index:010d}"


def _bad_shard(path: Path, problem: str) -> ShardError:
    return ShardError(f"shard {path} {problem}; {_REWRITE_HINT} to rewrite it")


def _encode(ext: str, value: Any) -> bytes:
    """Bytes for one field; TypeError/ValueError when the value does not fit the extension."""
    if ext == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)  # object arrays raise instead of pickling
        return buffer.getvalue()
    if ext == "cls":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"a cls field holds an int, not {type(value).__name__}")
        return str(int(value)).encode("ascii")
    if ext == "txt":
        if not isinstance(value, str):
            raise TypeError(f"a txt field holds a str, not {type(value).__name__}")
        return value.encode("utf-8")
    if ext == "json":  # sort_keys: equal values give equal bytes, so shards are reproducible
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        if not value.startswith(_PNG_SIGNATURE):
            raise ValueError("the bytes given for a png field are not a PNG file")
        return bytes(value)
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise TypeError(f"a png array must be uint8, not {value.dtype}")
        value = Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
    if not isinstance(value, Image.Image):
        raise TypeError(f"png takes PNG bytes, a PIL image or a uint8 array, not {type(value).__name__}")
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(ext: str, data: bytes) -> Any:
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle
    if ext == "cls":
        return int(data.decode("ascii"))
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image)


def _check_fields(fields: dict[str, str], where: Path) -> None:
    if not fields:
        raise ShardError(f"{where}: the schema has no fields; give at least one, e.g. {{'x': 'npy'}}")
    for name, ext in fields.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ShardError(
                f"{where}: field name {name!r} must be letters, digits, '_' or '-', starting with a letter or digit"
            )
        if ext not in FIELD_EXTENSIONS:
            raise ShardError(f"{where}: field {name!r} has extension {ext!r}; use one of {FIELD_EXTENSIONS}")


def _check_contiguous(records: list[ShardRecord], where: Path) -> None:
    if not records:
        raise ShardError(f"{where}: no shards listed; write the shards before the manifest")
    next_index = 0
    for record in records:
        if record.first_index != next_index or record.num_samples <= 0:
            raise ShardError(
                f"{where}: shard {record.name} covers indices from {record.first_index} "
                f"({record.num_samples} samples) but the shards before it end at {next_index}; "
                "shards must cover 0..N-1 without gaps or overlaps (a shard is missing or "
                "listed twice)"
            )
        next_index += record.num_samples
    if len({record.name for record in records}) != len(records):
        raise ShardError(f"{where}: a shard file is listed twice; each index range needs its own file")


def _check_verify(verify: str) -> None:
    if verify not in _VERIFY_MODES:
        raise ValueError(f"verify must be one of {_VERIFY_MODES}, got {verify!r}")


def _record_from_json(entry: dict) -> ShardRecord:
    record = ShardRecord(**entry)  # TypeError on missing or unknown keys
    counts = (record.first_index, record.num_samples, record.num_bytes)
    if not all(type(count) is int and count >= 0 for count in counts):
        raise ValueError(f"shard entry {entry} needs non-negative integer counts")
    # A plain file name keeps an edited manifest from pointing outside the shard directory.
    name = record.name
    if not isinstance(name, str) or name.startswith(".") or Path(name).name != name:
        raise ValueError(f"shard name {name!r} must be a plain file name")
    if not isinstance(record.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", record.sha256):
        raise ValueError(f"shard {record.name} has an invalid sha256 {record.sha256!r}")
    return record


def _encode_sample(sample: dict, fields: dict[str, str], index: int, path: Path) -> dict[str, bytes]:
    if not isinstance(sample, dict) or set(sample) != set(fields):
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ShardError(
            f"{path}: sample {index} has fields {got} but the schema is {sorted(fields)}; "
            "every sample must have exactly the schema's fields"
        )
    encoded = {"__key__": _sample_key(index)}
    for name, ext in fields.items():
        try:
            encoded[f"{name}.{ext}"] = _encode(ext, sample[name])
        except (TypeError, ValueError) as err:
            raise ShardError(f"{path}: sample {index} field {name!r} is not valid {ext}: {err}") from err
    return encoded


def write_shard(path: str | Path, samples: Iterable[dict], fields: dict[str, str], first_index: int) -> ShardRecord:
    """Atomically write samples with global indices first_index, first_index + 1, ... as one tar shard."""
    path = Path(path)
    _check_fields(fields, path)
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ShardError(f"{path}: first_index must be a non-negative int, got {first_index!r}")
    first_index = int(first_index)
    num_samples = 0

    def write(file: BinaryIO) -> None:
        nonlocal num_samples
        # encoder=False: we encode (and never pickle) ourselves. Fixed mtime, owner and mode make equal
        # samples give byte-identical shards whichever process, and how many, wrote the set.
        with wds.TarWriter(file, encoder=False, user="difftune", group="difftune", mtime=0) as tar:
            for position, sample in enumerate(samples):
                tar.write(_encode_sample(sample, fields, first_index + position, path))
                num_samples += 1
        if num_samples == 0:
            raise ShardError(f"{path}: no samples given; a shard holds at least one sample")

    atomic_write(path, write)
    # Hash what reached the disk (fresh in the page cache), not what we meant to write.
    return ShardRecord(path.name, first_index, num_samples, path.stat().st_size, file_sha256(path))


def write_manifest(
    directory: str | Path, shards: list[ShardRecord], fields: dict[str, str], meta: dict | None = None
) -> Path:
    """Atomically write manifest.json; call it last, once every listed shard is complete."""
    path = Path(directory) / MANIFEST_NAME
    _check_fields(fields, path)
    records = sorted(shards, key=lambda record: record.first_index)
    _check_contiguous(records, path)
    document = {
        "format": _FORMAT,
        "version": _VERSION,
        "fields": dict(fields),
        "num_samples": sum(record.num_samples for record in records),
        "shards": [asdict(record) for record in records],
        "meta": meta or {},
    }
    text = json.dumps(document, indent=2) + "\n"  # before the write: unserialisable meta leaves no file
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
    return path


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(
            f"no shard manifest at {path}: a shard set must be written by the prepare/generate "
            "job (run launch/prepare_data.py or launch/generate_bank.py), which writes "
            f"{MANIFEST_NAME} after every shard is complete"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != _FORMAT or document.get("version") != _VERSION:
            raise ValueError(f"expected format {_FORMAT!r} version {_VERSION}")
        fields, meta = dict(document["fields"]), dict(document.get("meta", {}))
        records = [_record_from_json(entry) for entry in document["shards"]]
        declared_num_samples = document["num_samples"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ShardError(
            f"{path} is not a valid shard manifest ({err!r}); re-run launch/prepare_data.py "
            "or launch/generate_bank.py to rewrite the shard set"
        ) from err
    _check_fields(fields, path)
    _check_contiguous(records, path)
    manifest = Manifest(fields, records, meta)
    if declared_num_samples != manifest.num_samples:
        raise ShardError(
            f"{path} says num_samples={declared_num_samples} but its shards hold "
            f"{manifest.num_samples}; {_REWRITE_HINT} to rewrite it"
        )
    return manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path, record: ShardRecord, verify: str) -> None:
    if not path.is_file():
        raise _bad_shard(path, "is listed in the manifest but missing")
    if verify != "none" and path.stat().st_size != record.num_bytes:
        raise _bad_shard(
            path, f"has {path.stat().st_size} bytes but the manifest says {record.num_bytes} (truncated or changed)"
        )
    if verify == "sha256" and file_sha256(path) != record.sha256:
        raise _bad_shard(path, "fails its sha256 check against the manifest (corrupt or changed)")


def _scan_members(path: Path, record: ShardRecord) -> dict[str, dict[str, tuple[int, int]]]:
    """Map sample key -> {"field.ext": (data offset, size)} from the tar headers alone."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:  # seeks over member data: only headers are read
            for info in tar:
                key, _, suffix = info.name.partition(".")
                # Refuse what we cannot decode safely (e.g. .pyd/.pickle) before a byte of it is read.
                if not info.isfile() or not suffix or info.name.rpartition(".")[2] not in FIELD_EXTENSIONS:
                    raise _bad_shard(
                        path,
                        f"holds member {info.name!r}, which is refused unread: only "
                        f"{FIELD_EXTENSIONS} fields are supported",
                    )
                if info.offset_data + info.size > file_size:
                    raise _bad_shard(path, f"is truncated inside member {info.name!r}")
                if suffix in samples.setdefault(key, {}):
                    raise _bad_shard(path, f"holds member {info.name!r} twice")
                samples[key][suffix] = (info.offset_data, info.size)
    except tarfile.TarError as err:
        raise _bad_shard(path, f"is not a readable tar file ({err}): truncated or corrupt") from err
    if len(samples) != record.num_samples:
        raise _bad_shard(path, f"holds {len(samples)} samples but the manifest says {record.num_samples}")
    last_index = record.first_index + record.num_samples - 1
    expected = {_sample_key(index) for index in range(record.first_index, last_index + 1)}
    if set(samples) != expected:
        raise _bad_shard(
            path,
            f"holds sample keys {sorted(set(samples) - expected)[:3]} outside the "
            f"manifest's indices {record.first_index}..{last_index}",
        )
    return samples


def check_shard(directory: str | Path, record: ShardRecord, verify: str = "sha256") -> None:
    """Raise ShardError unless the shard exists and matches its record (size, sha256, sample keys)."""
    _check_verify(verify)
    path = Path(directory) / record.name
    _check_file(path, record, verify)
    _scan_members(path, record)


def locate(index: int, starts: list[int], num_samples: int, directory: Path) -> tuple[int, int]:
    """(index, shard) of global sample `index`, given each shard's first index; checked against the bank's size."""
    index = operator.index(index)
    if not 0 <= index < num_samples:  # a negative index is a sampler bug, not "from the end"
        raise IndexError(f"index {index} is out of range for {num_samples} samples in {directory}")
    return index, bisect.bisect_right(starts, index) - 1


def field_columns(names: list[str], fields: Iterable[str], directory: Path) -> list[int]:
    """Positions of `fields` among a shard set's field `names`; ShardError naming any field it lacks."""
    fields = list(fields)
    missing = [name for name in fields if name not in names]
    if missing:
        raise ShardError(f"{directory} has no field {missing} (its fields are {names}); write the shards with them")
    return [names.index(name) for name in fields]


class ShardDataset:
    """Random access to a shard set by global sample index.

    Start-up checks every shard against the manifest, so a bad shard stops the run before any work, and
    indexes where each member's bytes lie; an item then costs one positioned read per field. os.pread
    shares no file position, so forked workers may use inherited descriptors; pickling drops them.
    """

    def __init__(self, directory: str | Path, verify: str = "sha256"):
        _check_verify(verify)
        self._fds: dict[int, int] = {}  # shard number -> open descriptor, opened lazily
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._names = sorted(self.manifest.fields)
        self._exts = [self.manifest.fields[name] for name in self._names]
        self._starts = [record.first_index for record in self.manifest.shards]
        # Per shard, (num_samples, num_fields, 2) offsets and sizes: compact for millions of samples.
        self._locations: list[np.ndarray] = []
        for record in self.manifest.shards:
            path = self.directory / record.name
            _check_file(path, record, verify)
            members = _scan_members(path, record)
            suffixes = [f"{name}.{ext}" for name, ext in zip(self._names, self._exts, strict=True)]
            locations = np.empty((record.num_samples, len(suffixes), 2), dtype=np.int64)
            for position in range(record.num_samples):
                found = members[_sample_key(record.first_index + position)]
                if set(found) != set(suffixes):
                    raise _bad_shard(
                        path,
                        f"has sample {record.first_index + position} with members "
                        f"{sorted(found)} but the schema is {sorted(suffixes)}",
                    )
                locations[position] = [found[suffix] for suffix in suffixes]
            self._locations.append(locations)

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._names)

    def __getitem__(self, index: int) -> dict:
        return self.read(index)

    def read(self, index: int, fields: Iterable[str] | None = None) -> dict:
        """Sample `index` with only `fields` (all when None) read and decoded, plus its "__index__"."""
        columns = range(len(self._names)) if fields is None else field_columns(self._names, fields, self.directory)
        index, shard = locate(index, self._starts, len(self), self.directory)
        record = self.manifest.shards[shard]
        path = self.directory / record.name
        fd = self._open(shard)
        locations = self._locations[shard][index - record.first_index]
        sample: dict[str, Any] = {}
        for column in columns:
            (offset, size), name = locations[column], self._names[column]
            data = os.pread(fd, int(size), int(offset))
            if len(data) != size:
                raise _bad_shard(path, f"is truncated (short read of sample {index})")
            try:
                sample[name] = _decode(self._exts[column], data)
            except (ValueError, TypeError, OSError, EOFError) as err:
                raise _bad_shard(path, f"has an undecodable {name!r} in sample {index} ({err})") from err
        sample["__index__"] = index
        return sample

    def _open(self, shard: int) -> int:
        if shard not in self._fds:
            if len(self._fds) >= _MAX_OPEN_FILES:  # close the oldest; dicts keep insertion order
                os.close(self._fds.pop(next(iter(self._fds))))
            path = self.directory / self.manifest.shards[shard].name
            try:
                self._fds[shard] = os.open(path, os.O_RDONLY)
            except FileNotFoundError as err:
                raise _bad_shard(path, "disappeared after start-up") from err
        return self._fds[shard]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}  # descriptors belong to this process; the copy reopens lazily
        return state

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()
