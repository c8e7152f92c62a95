"""Image sets for the metrics (sample shards, reference shards or an ImageFolder) and their features; the
evaluation sets whose conditions (prompt tokens, control maps) the samples of a non-class-conditional family take.

Every rank extracts the features of the chunks it owns, in batches cut at fixed offsets, and the rows are
combined with one all-reduce (each row is written by exactly one rank, the others add zeros), so every rank
ends with the same, index-ordered features on 1 rank or 64. Reference features are cached by the
fingerprints of the reference and of the extractor.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.files import atomic_write_bytes
from data.formats import open_shard_set
from data.images import list_image_folder, load_images
from data.shard_jobs import owned_shards, shard_ranges
from data.shards import MANIFEST_NAME
from trainer import distributed
from trainer.evaluation.features import FeatureExtractor

FEATURE_CHUNK = 1000  # images per unit of work when extracting features


@dataclass
class ImageSet:
    """`read(indices)` gives uint8 NCHW images; `fingerprint` changes whenever the images can."""

    num_images: int
    read: Callable[[range], torch.Tensor]
    fingerprint: str
    classes: list[str] | None


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def open_image_set(path: str, family, image_size: int, key: str = "eval.reference", verify: str = "size") -> ImageSet:
    """Shards (a png 'image' field, or 'x' in the model's pixel or latent space) or an ImageFolder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}={path} is not a folder: point it to shards (with {MANIFEST_NAME}) or an ImageFolder"
        )
    if not (folder / MANIFEST_NAME).is_file():
        try:
            listing = list_image_folder(folder)
        except ValueError as err:  # its messages name the prepare job's key
            raise ValueError(str(err).replace("prepare.images", key)) from None
        digest = hashlib.sha256(f"{image_size}\n".encode())
        for name, label in listing.files:
            digest.update(f"{label}\t{name}\t{(folder / name).stat().st_size}\n".encode())
        paths = [folder / name for name, _ in listing.files]

        def read_files(indices: range) -> torch.Tensor:
            return to_uint8(torch.from_numpy(load_images([paths[i] for i in indices], image_size)))

        return ImageSet(len(paths), read_files, digest.hexdigest(), listing.classes)
    dataset = open_shard_set(folder, verify=verify)
    fields = dataset.manifest.fields
    if "image" not in fields and "x" not in fields:
        raise ValueError(f"{key}={path}: its shards have neither an 'image' nor an 'x' field ({sorted(fields)})")
    manifest_sha = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()

    def read_shards(indices: range) -> torch.Tensor:
        if "image" in fields:
            return torch.from_numpy(np.stack([dataset[i]["image"] for i in indices])).permute(0, 3, 1, 2).contiguous()
        x = torch.from_numpy(np.stack([dataset[i]["x"] for i in indices])).float()
        if tuple(x.shape[1:]) != tuple(family.sample_shape):
            shape = tuple(x.shape[1:])
            raise ValueError(f"{key}={path}: 'x' has shape {shape} but the model samples {family.sample_shape}")
        return to_uint8(family.decode(x).cpu())

    return ImageSet(len(dataset), read_shards, manifest_sha, dataset.manifest.meta.get("classes"))


def read_fields(dataset, indices: list[int] | range, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{field: tensor stacked over `indices`} of a shard set (labels, tokens, uint8 HWC controls, latents)."""
    items = [dataset[i] for i in indices]
    return {name: torch.from_numpy(np.stack([np.asarray(item[name]) for item in items])) for name in names}


@dataclass
class ConditionSet:
    """An evaluation set of prepared shards (eval.data): sample i takes the conditions of entry i mod its length."""

    dataset: object
    fields: tuple[str, ...]  # the family's condition fields
    fingerprint: str  # the manifest's sha256: the samples' bytes depend on it

    def __len__(self) -> int:
        return len(self.dataset)

    def entry_of(self, index: int) -> int:
        return index % len(self.dataset)

    def read(self, entries: list[int] | range) -> dict[str, torch.Tensor]:
        return read_fields(self.dataset, entries, self.fields)


def open_condition_set(path: str, family, image_size: int, key: str, verify: str, need_x: bool = False):
    """Prepared shards that hold the family's condition fields (and the clean samples 'x' if `need_x`), checked
    against the model: 'x' of its sample shape, image-like fields (uint8 H x W x 3) at its image size."""
    folder = Path(path)
    if not (folder / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"{key}={path} holds no shard set ({MANIFEST_NAME}): point it to shards written by launch/prepare_data.py "
            "with this model's config"
        )
    dataset = open_shard_set(folder, verify=verify)
    needed = (*family.condition_fields, "x") if need_x else tuple(family.condition_fields)
    missing = [name for name in needed if name not in dataset.manifest.fields]
    if missing:
        raise ValueError(
            f"{key}={path}: its shards lack the field(s) {missing} that model.family={family.name} needs "
            f"({list(needed)}; they hold {sorted(dataset.manifest.fields)}): prepare them with launch/prepare_data.py "
            "and this model's config"
        )
    if len(dataset) == 0:
        raise ValueError(f"{key}={path} holds no samples")
    first = dataset[0]
    if "x" in dataset.manifest.fields and tuple(np.shape(first["x"])) != tuple(family.sample_shape):
        raise ValueError(
            f"{key}={path}: its samples 'x' have shape {tuple(np.shape(first['x']))} but the model samples "
            f"{tuple(family.sample_shape)}: prepare the set at the model's resolution (prepare.resolution={image_size})"
        )
    for name in family.condition_fields:
        shape = np.shape(first[name])
        if len(shape) == 3 and shape[-1] == 3 and tuple(shape[:2]) != (image_size, image_size):
            raise ValueError(
                f"{key}={path}: its '{name}' maps are {shape[0]}x{shape[1]} px but the model makes {image_size}x"
                f"{image_size} px images: prepare the set at the model's resolution (prepare.resolution={image_size})"
            )
    manifest_sha = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    return ConditionSet(dataset, tuple(family.condition_fields), manifest_sha)


def image_maps(fields: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The image-like condition fields (uint8 N x H x W x 3, e.g. control maps) as uint8 NCHW, for the grids."""
    maps = [v for v in fields.values() if v.dtype == torch.uint8 and v.ndim == 4 and v.shape[-1] == 3]
    return [v.permute(0, 3, 1, 2).contiguous() for v in maps]


def image_size_of(family) -> int:
    """Side of the decoded samples: the model-space side times the family's downsampling (its VAE's)."""
    return family.sample_shape[-1] * family.latent_downsampling


@torch.no_grad()
def set_features(
    images: ImageSet, extractor: FeatureExtractor, image_size: int, batch_size: int, rank: int, world: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"pooled", "spatial"} features of every image of the set, on every rank (a collective)."""
    pooled_dim, spatial_dim = extractor.dims(image_size)
    pooled = torch.zeros((images.num_images, pooled_dim), device=device)
    spatial = torch.zeros((images.num_images, spatial_dim), device=device)
    chunks = shard_ranges(images.num_images, FEATURE_CHUNK)
    for j in owned_shards(len(chunks), rank, world):
        for start in range(chunks[j].start, chunks[j].stop, batch_size):
            batch = range(start, min(start + batch_size, chunks[j].stop))
            pooled[batch.start : batch.stop], spatial[batch.start : batch.stop] = extractor(images.read(batch))
    return {"pooled": distributed.all_reduce_sum(pooled).cpu(), "spatial": distributed.all_reduce_sum(spatial).cpu()}


def reference_features(
    images: ImageSet, extractor: FeatureExtractor, image_size: int, cache_dir: str, batch_size: int, rank: int,
    world: int, device: torch.device,
) -> tuple[dict[str, torch.Tensor], bool]:  # fmt: skip
    """The reference's features, from the cache when there; (features, whether they came from the cache)."""
    key = hashlib.sha256(f"{images.fingerprint}\n{extractor.fingerprint}\n{image_size}".encode()).hexdigest()
    path = Path(cache_dir) / f"reference-{key[:32]}.pt"
    if not distributed.any_rank(not path.is_file(), device):  # all ranks take the same branch
        return torch.load(path, map_location="cpu", weights_only=True), True
    features = set_features(images, extractor, image_size, batch_size, rank, world, device)
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(features, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    return features, False
