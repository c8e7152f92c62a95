"""Composed shard sets: a manifest over parts of existing shard sets, served by global index, nothing copied.

A continual run's memory bank keeps a seeded subset of the previous bank and adds newly generated samples;
a stage's target data maps its own class ids onto the run's growing class table. Both are a `manifest.json`
whose parts each name a shard set, the global indices kept from it (in order), the lineage of those samples
(which model generated them, at which stage) and optionally a label map. Global index i of the composed set
is the i-th kept index, parts in order. Each part's manifest sha256 is recorded, so a part rewritten after
composition is refused at start-up (DESIGN invariant 3).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.files import atomic_write_bytes
from data.shards import MANIFEST_NAME, ShardError

COMPOSED_FORMAT, COMPOSED_VERSION = "difftune-composed", 1


@dataclass(frozen=True)
class Part:
    """Samples `indices` of the shard set at `path`, in that order; `labels[c]` is the composed id of class c."""

    path: str
    indices: list[int]
    lineage: dict = field(default_factory=dict)  # e.g. {"generator": folder, "weights_sha256": ..., "stage": 2}
    labels: list[int] | None = None  # None: the part's labels as they are
    manifest_sha256: str = ""  # filled in by write_composed


@dataclass(frozen=True)
class ComposedManifest:
    fields: dict[str, str]
    parts: list[Part]
    meta: dict

    @property
    def num_samples(self) -> int:
        return sum(len(part.indices) for part in self.parts)


def manifest_sha256(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST_NAME).read_bytes()).hexdigest()


def is_composed(directory: str | Path) -> bool:
    path = Path(directory) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == COMPOSED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # the shard reader gives the message


def keep_subset(num_samples: int, num_kept: int, seed: Sequence[int]) -> list[int]:
    """A seeded choice of `num_kept` of `num_samples` indices, in increasing order (recorded in the manifest)."""
    if not 0 <= num_kept <= num_samples:
        raise ValueError(f"cannot keep {num_kept} of {num_samples} samples")
    chosen = np.random.default_rng(list(seed)).choice(num_samples, size=num_kept, replace=False)
    return sorted(int(i) for i in chosen)


def resolve_parts(path: str | Path, indices: Iterable[int], lineage: dict | None = None) -> list[Part]:
    """Parts over plain shard sets holding `indices` of the set at `path`; a composed set is looked through,
    so compositions never nest and every sample keeps the lineage of the part it came from."""
    indices = [int(i) for i in indices]
    if not is_composed(path):
        return [Part(str(Path(path).resolve()), indices, dict(lineage or {}))]
    manifest = read_composed(path)
    starts = np.cumsum([0] + [len(part.indices) for part in manifest.parts]).tolist()
    by_part: dict[int, list[int]] = {}
    for index in indices:
        if not 0 <= index < starts[-1]:
            raise ValueError(f"index {index} is outside the composed set {path} of {starts[-1]} samples")
        number = bisect.bisect_right(starts, index) - 1
        by_part.setdefault(number, []).append(manifest.parts[number].indices[index - starts[number]])
    return [
        Part(manifest.parts[n].path, kept, manifest.parts[n].lineage, manifest.parts[n].labels)
        for n, kept in sorted(by_part.items())
    ]


# Opens a part's shard set in its own format: data.formats.open_shard_set, which registers this module and so is
# passed in rather than imported back.
OpenPart = Callable[..., object]


def write_composed(directory: str | Path, parts: list[Part], open_part: OpenPart, meta: dict | None = None) -> Path:
    """Checks every part against its shard set and writes `directory/manifest.json` atomically."""
    directory = Path(directory)
    fields, recorded = None, []
    for number, part in enumerate(parts):
        dataset = open_part(part.path, verify="size")
        try:
            part_fields = dict(dataset.manifest.fields)
            size = len(dataset)
        finally:
            dataset.close()
        if fields is not None and part_fields != fields:
            raise ShardError(
                f"{directory}: part {number} ({part.path}) has fields {part_fields} but part 0 has {fields}; "
                "compose only shard sets written with the same fields"
            )
        fields = part_fields
        bad = [i for i in part.indices if not 0 <= i < size]
        if bad:
            raise ShardError(f"{directory}: part {number} ({part.path}) has {size} samples; indices {bad[:5]} are not")
        recorded.append(Part(str(Path(part.path).resolve()), [int(i) for i in part.indices], dict(part.lineage),
                             None if part.labels is None else [int(c) for c in part.labels],
                             manifest_sha256(part.path)))  # fmt: skip
    if fields is None:
        raise ShardError(f"{directory}: a composed set needs at least one part")
    document = {
        "format": COMPOSED_FORMAT, "version": COMPOSED_VERSION, "fields": fields,
        "num_samples": sum(len(part.indices) for part in recorded),
        "parts": [asdict(part) for part in recorded], "meta": meta or {},
    }  # fmt: skip
    path = directory / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    return path


def read_composed(directory: str | Path) -> ComposedManifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != COMPOSED_FORMAT or document.get("version") != COMPOSED_VERSION:
            raise ValueError(f"expected format {COMPOSED_FORMAT!r} version {COMPOSED_VERSION}")
        parts = [Part(**entry) for entry in document["parts"]]
        manifest = ComposedManifest(dict(document["fields"]), parts, dict(document.get("meta", {})))
        if document["num_samples"] != manifest.num_samples:
            raise ValueError(f"num_samples={document['num_samples']} but the parts hold {manifest.num_samples}")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ShardError(f"{path} is not a valid composed manifest ({err}); compose the set again") from err
    return manifest


class ComposedDataset:
    """Random access by global index to a composed set, a drop-in for data.shards.ShardDataset."""

    def __init__(self, directory: str | Path, open_part: OpenPart, verify: str = "sha256") -> None:
        self.directory = Path(directory)
        self.manifest = read_composed(self.directory)
        self.parts = []
        for number, part in enumerate(self.manifest.parts):
            if not (Path(part.path) / MANIFEST_NAME).is_file() or manifest_sha256(part.path) != part.manifest_sha256:
                raise ShardError(
                    f"{self.directory}: part {number} ({part.path}) is missing or was rewritten after the set was "
                    "composed (its manifest's sha256 differs); compose the set again"
                )
            self.parts.append(open_part(part.path, verify=verify))
        self._starts = np.cumsum([0] + [len(part.indices) for part in self.manifest.parts]).tolist()
        self._labels = [None if p.labels is None else np.asarray(p.labels) for p in self.manifest.parts]

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest.fields))

    def __getitem__(self, index: int) -> dict:
        return self.read(index)

    def locate(self, index: int) -> tuple[int, int]:
        """(part number, index inside that part's shard set) of global index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside {self.directory} ({len(self)} samples)")
        number = bisect.bisect_right(self._starts, index) - 1
        return number, self.manifest.parts[number].indices[index - self._starts[number]]

    def lineage(self, index: int) -> dict:
        return self.manifest.parts[self.locate(index)[0]].lineage

    def read(self, index: int, fields: Iterable[str] | None = None) -> dict:
        """Sample `index` with only `fields` (all when None), its label mapped, plus its "__index__"."""
        number, inner = self.locate(int(index))
        sample = self.parts[number].read(inner, fields)
        if "label" in sample and self._labels[number] is not None:
            sample["label"] = int(self._labels[number][sample["label"]])
        sample["__index__"] = int(index)
        return sample

    def close(self) -> None:
        for part in self.parts:
            part.close()
