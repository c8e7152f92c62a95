"""MosaicML-streaming MDS shards behind the same manifest and checks as the webdataset shards of data/shards.py.

One of our shards is one directory ``shard-XXXXXX.mds/`` holding MDS's ``index.json`` and its
``shard.NNNNN.mds`` files. ``manifest.json`` is data/shards.py's, with ``"format": "mds"`` in its meta; a
shard's sha256 covers its sorted (file name, file sha256) list. Readers check every shard at start-up and
never unpickle: an index.json declaring any encoding outside the few we write is refused unread.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import secrets
import shutil
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.files import fsync_dir
from data.shards import (
    Manifest,
    ShardError,
    ShardRecord,
    _bad_shard,
    _check_fields,
    _check_verify,
    _encode,
    field_columns,
    file_sha256,
    locate,
    read_manifest,
    write_manifest,
)

MDS_FORMAT = "mds"  # the manifest meta's "format" for MDS shard sets
INDEX_NAME = "index.json"  # MDS's own per-directory index
# Our field extension -> MDS column encoding. These are also the only encodings a reader accepts.
MDS_ENCODINGS = {"npy": "ndarray", "cls": "int", "txt": "str", "json": "json", "png": "png"}
# What MDS's dynamic "ndarray" encoding can store (dtype and shape are kept per sample).
_NDARRAY_DTYPES = "uint8 int8 uint16 int16 uint32 int32 uint64 int64 float16 float32 float64".split()
# MDSWriter holds a whole MDS file in memory (twice while joining it); a larger shard gets several files.
_MDS_FILE_BYTES = 1 << 30


def _streaming() -> types.ModuleType:
    """Imports streaming lazily: it costs seconds (it imports transformers) that webdataset runs need not pay."""
    # `import streaming` imports streaming.vision, which needs torchvision; torchvision cannot load with the
    # CPU torch wheel and we never use its vision datasets, so a placeholder stands in for it.
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming.base.format.mds as mds

    return mds


def mds_shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.mds"


def _mds_value(ext: str, value: Any) -> Any:
    """The value MDSWriter stores for one field; TypeError/ValueError when it does not fit the extension."""
    if ext == "npy":
        array = np.asarray(value)
        if array.dtype.name not in _NDARRAY_DTYPES or array.dtype.hasobject:
            raise TypeError(
                f"MDS arrays hold {' '.join(_NDARRAY_DTYPES)}, not {array.dtype}; cast it or use webdataset shards"
            )
        if array.ndim == 0 or array.size == 0:
            raise ValueError(f"MDS arrays need a dimension and an element, got shape {array.shape}; reshape it")
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))  # MDS stores native bytes
    if ext == "json":  # through sorted keys: equal values give equal bytes, as in the tar shards
        return json.loads(_encode("json", value))
    if ext == "png":  # our checked PNG bytes; MDS stores bytes given for any column as they are
        return _encode("png", value)
    _encode(ext, value)  # cls/txt: the same type checks and messages as the tar writer
    return int(value) if ext == "cls" else value


def _mds_sample(sample: Any, fields: dict[str, str], index: int, path: Path) -> dict[str, Any]:
    if not isinstance(sample, dict) or set(sample) != set(fields):
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ShardError(
            f"{path}: sample {index} has fields {got} but the schema is {sorted(fields)}; "
            "every sample must have exactly the schema's fields"
        )
    values = {}
    for name, ext in fields.items():
        try:
            values[name] = _mds_value(ext, sample[name])
        except (TypeError, ValueError) as err:
            raise ShardError(f"{path}: sample {index} field {name!r} is not valid {ext} for MDS: {err}") from err
    return values


def hash_mds_shard(path: str | Path) -> tuple[int, str]:
    """(total bytes, sha256 over the sorted (file name, file sha256) list) of an MDS shard directory."""
    path, digest, num_bytes = Path(path), hashlib.sha256(), 0
    for name in _list_files(path):
        num_bytes += (path / name).stat().st_size
        digest.update(f"{name}\0{file_sha256(path / name)}\n".encode())
    return num_bytes, digest.hexdigest()


def _list_files(path: Path) -> list[str]:
    entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    odd = [entry.name for entry in entries if not entry.is_file(follow_symlinks=False)]
    if odd:
        raise _bad_shard(path, f"holds {odd}, which are not plain files")
    return [entry.name for entry in entries]


def write_mds_shard(
    path: str | Path,
    samples: Iterable[dict],
    fields: dict[str, str],
    first_index: int,
    *,
    size_limit_bytes: int = _MDS_FILE_BYTES,
) -> ShardRecord:
    """Atomically write samples with global indices first_index, first_index + 1, ... as one MDS directory."""
    path = Path(path)
    _check_fields(fields, path)
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ShardError(f"{path}: first_index must be a non-negative int, got {first_index!r}")
    first_index = int(first_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leading dot + ".tmp": a half-written shard never looks like one; pid + token keep writers apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        columns = {name: MDS_ENCODINGS[ext] for name, ext in fields.items()}
        writer = _streaming().MDSWriter(columns=columns, out=str(tmp), size_limit=size_limit_bytes)
        num_samples = 0
        try:
            for position, sample in enumerate(samples):
                writer.write(_mds_sample(sample, fields, first_index + position, path))
                num_samples += 1
            if num_samples == 0:
                raise ShardError(f"{path}: no samples given; a shard holds at least one sample")
            writer.finish()  # not a `with`: its exit would write an index for a failed, partial shard
        finally:
            writer.cancel_future_jobs()  # stops its (idle, local-only) upload threads either way
        for name in _list_files(tmp):
            with open(tmp / name, "rb") as file:
                os.fsync(file.fileno())
        fsync_dir(tmp)
        if path.exists():  # a directory cannot be replaced in one step: move the old one aside first
            old = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)  # makes the rename itself durable
    num_bytes, sha256 = hash_mds_shard(path)  # what reached the disk, not what we meant to write
    return ShardRecord(path.name, first_index, num_samples, num_bytes, sha256)


def write_mds_manifest(
    directory: str | Path, shards: list[ShardRecord], fields: dict[str, str], meta: dict | None = None
) -> Path:
    """data/shards.py's manifest, marked as MDS so that a reader of the other format refuses it clearly."""
    return write_manifest(directory, shards, fields, {**(meta or {}), "format": MDS_FORMAT})


def _check_index(path: Path, fields: dict[str, str] | None) -> list[dict]:
    """The MDS index entries of a shard, refusing unsafe encodings before any sample byte is read."""
    try:
        document = json.loads((path / INDEX_NAME).read_bytes())
        entries = document["shards"]
        if document["version"] != 2 or not isinstance(entries, list) or not entries:
            raise ValueError("expected MDS index version 2 listing at least one file")
        for entry in entries:
            columns = list(zip(entry["column_names"], entry["column_encodings"], strict=True))
            for name, encoding in columns:
                if encoding not in MDS_ENCODINGS.values():
                    safe = sorted(MDS_ENCODINGS.values())
                    problem = f"declares column {name!r} with MDS encoding {encoding!r}, refused unread (only {safe}"
                    raise _bad_shard(path, problem + " are read; pickled data is never loaded)")
            if fields is not None and columns != sorted((n, MDS_ENCODINGS[ext]) for n, ext in fields.items()):
                raise ValueError(f"columns {columns} do not match the manifest's fields {fields}")
            basename, samples = entry["raw_data"]["basename"], entry["samples"]
            if entry["format"] != MDS_FORMAT or entry["version"] != 2 or entry["compression"] or entry["zip_data"]:
                raise ValueError("expected uncompressed MDS version 2 files")
            if basename.startswith(".") or Path(basename).name != basename or basename == INDEX_NAME:
                raise ValueError(f"file name {basename!r} must be a plain file name")
            # MDSWriter writes an empty file first when the first sample alone exceeds its size limit.
            if type(samples) is not int or samples < 0 or type(entry["raw_data"]["bytes"]) is not int:
                raise ValueError(f"{basename} needs non-negative integer counts")
    except FileNotFoundError as err:
        raise _bad_shard(path, f"has no MDS {INDEX_NAME}") from err
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise _bad_shard(path, f"has an invalid MDS {INDEX_NAME} ({err})") from err
    return entries


def _check_mds_file(path: Path, name: str, num_samples: int, num_bytes: int) -> None:
    """The file's size and sample offset table agree with index.json (catches truncation in any verify mode)."""
    size = (path / name).stat().st_size
    if size != num_bytes:
        raise _bad_shard(path, f"has {name} of {size} bytes but its {INDEX_NAME} says {num_bytes} (truncated?)")
    with open(path / name, "rb") as file:  # MDS file: uint32 count, count + 1 uint32 offsets, config, samples
        head = np.frombuffer(file.read(4 * (num_samples + 2)), np.uint32)
    if len(head) != num_samples + 2 or head[0] != num_samples:
        raise _bad_shard(path, f"has {name} whose header does not hold the {num_samples} samples of {INDEX_NAME}")
    offsets = head[1:].astype(np.int64)
    if offsets[0] < 4 * len(head) or np.any(np.diff(offsets) < 0) or offsets[-1] != size:
        raise _bad_shard(path, f"has {name} with an inconsistent sample offset table (corrupt)")


def check_mds_shard(
    directory: str | Path, record: ShardRecord, verify: str = "sha256", fields: dict[str, str] | None = None
) -> list[dict]:
    """Raise ShardError unless the shard exists and matches its record; returns its MDS index entries."""
    _check_verify(verify)
    path = Path(directory) / record.name
    if not path.is_dir():
        raise _bad_shard(path, "is listed in the manifest but missing")
    names = _list_files(path)
    num_bytes = sum((path / name).stat().st_size for name in names)
    if verify != "none" and num_bytes != record.num_bytes:
        raise _bad_shard(path, f"has {num_bytes} bytes but the manifest says {record.num_bytes} (truncated?)")
    if verify == "sha256" and hash_mds_shard(path)[1] != record.sha256:
        raise _bad_shard(path, "fails its sha256 check against the manifest (corrupt or changed)")
    entries = _check_index(path, fields)
    expected = {INDEX_NAME} | {entry["raw_data"]["basename"] for entry in entries}
    if (found := set(names)) != expected:
        raise _bad_shard(path, f"lacks {sorted(expected - found)} or holds unexpected {sorted(found - expected)}")
    for entry in entries:
        _check_mds_file(path, entry["raw_data"]["basename"], entry["samples"], entry["raw_data"]["bytes"])
    num_samples = sum(entry["samples"] for entry in entries)
    if num_samples != record.num_samples:
        raise _bad_shard(path, f"holds {num_samples} samples but the manifest says {record.num_samples}")
    return entries


def _decode_columns(reader: Any, data: bytes, names: Iterable[str]) -> dict[str, Any]:
    """MDSReader.decode_sample for `names` only: the other columns are skipped undecoded."""
    from streaming.base.format.mds.encodings import mds_decode  # loaded with the reader, by _streaming()

    wanted, sample, offset, sizes = set(names), {}, 0, []
    for size in reader.column_sizes:  # a sample starts with a uint32 size per variable-size column
        if not size:
            size = int(np.frombuffer(data, np.uint32, 1, offset)[0])
            offset += 4
        sizes.append(size)
    for name, encoding, size in zip(reader.column_names, reader.column_encodings, sizes, strict=True):
        if name in wanted:
            sample[name] = mds_decode(encoding, data[offset : offset + size])
        offset += size
    return sample


class MDSDataset:
    """Random access to an MDS shard set by global sample index, a drop-in for data.shards.ShardDataset.

    Start-up checks every shard, so a bad one stops the run before any work. streaming's MDSReader
    (one per MDS file, made on first use) reads a sample by opening the file, so nothing stays open.
    """

    def __init__(self, directory: str | Path, verify: str = "sha256") -> None:
        _check_verify(verify)
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        if self.manifest.meta.get("format") != MDS_FORMAT:
            raise ShardError(
                f"{self.directory} holds webdataset tar shards, not MDS (its manifest meta has no "
                f'"format": "{MDS_FORMAT}"); read it with data.shards.ShardDataset or set the data format to match'
            )
        self._starts = [record.first_index for record in self.manifest.shards]
        self._entries = [check_mds_shard(self.directory, r, verify, self.manifest.fields) for r in self.manifest.shards]
        self._file_starts = [np.cumsum([0] + [e["samples"] for e in entries]).tolist() for entries in self._entries]
        self._readers: dict[tuple[int, int], Any] = {}
        self._png = [name for name, ext in self.manifest.fields.items() if ext == "png"]
        self._npy = [name for name, ext in self.manifest.fields.items() if ext == "npy"]

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest.fields))

    def __getitem__(self, index: int) -> dict:
        return self.read(index)

    def read(self, index: int, fields: Iterable[str] | None = None) -> dict:
        """Sample `index` with only `fields` (all when None) decoded, plus its "__index__"."""
        names = (
            self.fields
            if fields is None
            else [self.fields[c] for c in field_columns(self.fields, fields, self.directory)]
        )
        index, shard = locate(index, self._starts, len(self), self.directory)
        local = index - self._starts[shard]
        file = bisect.bisect_right(self._file_starts[shard], local) - 1
        path = self.directory / self.manifest.shards[shard].name
        try:
            reader = self._reader(shard, file)
            sample = _decode_columns(reader, reader.get_sample_data(local - self._file_starts[shard][file]), names)
            for name in set(self._png) & set(names):
                with sample[name] as image:
                    if image.format != "PNG":  # MDS opens any image format; a png field holds PNG only
                        raise ValueError(f"{name!r} is {image.format}, not PNG")
                    sample[name] = np.asarray(image)
        except FileNotFoundError as err:
            raise _bad_shard(path, "disappeared after start-up") from err
        except (ValueError, TypeError, IndexError, KeyError, OSError, EOFError, Image.DecompressionBombError) as err:
            raise _bad_shard(path, f"has an undecodable sample {index} ({err})") from err
        for name in set(self._npy) & set(names):  # frombuffer gives read-only arrays; ShardDataset's are writable
            sample[name] = sample[name].copy()
        sample["__index__"] = index
        return sample

    def _reader(self, shard: int, file: int) -> Any:
        if (shard, file) not in self._readers:
            path = self.directory / self.manifest.shards[shard].name
            self._readers[shard, file] = _streaming().MDSReader.from_json(str(path), None, self._entries[shard][file])
        return self._readers[shard, file]

    def close(self) -> None:
        self._readers.clear()  # readers hold no open files; kept for parity with ShardDataset

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = {}  # the copy remakes them lazily
        return state
