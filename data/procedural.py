"""Two procedural image domains for the embedded demo: the same four shapes in two styles.

SOURCE (broad, the "pre-training" distribution): shapes of any hue on dark or light, flat or gradient backgrounds.
TARGET (narrow and shifted, the downstream domain): cool-coloured (cyan..purple), dark, slightly larger, more
centred shapes, always on a light gradient.

Every low-level statistic of TARGET (colours, edges, gradients) also occurs in SOURCE, so the pre-trained model is
a good denoiser of lightly noised TARGET images, while its coarse, high-noise knowledge (which colours, layouts and
backgrounds are likely) is wrong for TARGET: the regime of Diff-Tuning's chain of forgetting, as in ImageNet ->
a fine-grained dataset.

Everything is a pure function of `(domain, num, seed, size)` and vectorised over the batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DOMAINS = ("source", "target")
CLASS_NAMES = ("disc", "square", "ring", "cross")
NUM_CLASSES = len(CLASS_NAMES)
# Scalar attributes of each image, in [0, 1] after `normalised_attributes`; the feature net regresses them so
# that its features also see within-class variation (position, size, colours), not only the class.
ATTRIBUTE_NAMES = ("cx", "cy", "radius", "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b")

# Per-domain style: shape radius range (in units of the image size), centre jitter (same units), foreground
# hue/saturation ranges, foreground value on dark and on light backgrounds (so that shapes always contrast), and
# the probabilities of a light background and of a gradient one.
_STYLES = {
    "source": dict(
        radius=(0.2, 0.4),
        jitter=0.09,
        hue=(0.0, 1.0),
        sat=(0.4, 1.0),
        val_dark=(0.6, 1.0),
        val_light=(0.2, 0.65),
        light=0.5,
        gradient=0.5,
    ),
    "target": dict(
        radius=(0.28, 0.40),
        jitter=0.06,
        hue=(0.45, 0.78),
        sat=(0.45, 0.9),
        val_dark=(0.6, 1.0),
        val_light=(0.3, 0.6),
        light=1.0,
        gradient=1.0,
    ),
}


def sample_attributes(domain: str, num: int, seed: int) -> dict[str, np.ndarray]:
    """Random labels and style attributes of `num` images; a pure function of (domain, num, seed)."""
    if domain not in _STYLES:
        raise ValueError(f"unknown procedural domain {domain!r}; known: {', '.join(DOMAINS)}")
    style = _STYLES[domain]
    # The domain index is part of the seed so that the two domains never share random draws.
    rng = np.random.default_rng([seed, DOMAINS.index(domain)])
    labels = rng.integers(0, NUM_CLASSES, num)
    centre = 0.5 + rng.uniform(-style["jitter"], style["jitter"], (num, 2))
    radius = rng.uniform(*style["radius"], num)
    hue = np.mod(rng.uniform(*style["hue"], num), 1.0)
    sat = rng.uniform(*style["sat"], num)
    light = rng.uniform(size=num) < style["light"]
    gradient = rng.uniform(size=num) < style["gradient"]
    val = np.where(light, rng.uniform(*style["val_light"], num), rng.uniform(*style["val_dark"], num))
    fg = _hsv_to_rgb(hue, sat, val)
    # Pastel or dark end colours; a flat background has both ends equal. The angle only matters for gradients.
    ends = np.where(light[None, :, None], rng.uniform(0.7, 0.95, (2, num, 3)), rng.uniform(0.04, 0.22, (2, num, 3)))
    bg_a, bg_b = ends[0], np.where(gradient[:, None], ends[1], ends[0])
    angle = rng.uniform(0, 2 * np.pi, num)
    return dict(labels=labels, centre=centre, radius=radius, fg=fg, bg_a=bg_a, bg_b=bg_b, angle=angle)


def render(attributes: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Images [N, size, size, 3] uint8 of the shapes described by `attributes` (from `sample_attributes`)."""
    num = len(attributes["labels"])
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    # Pixel offsets from each shape's centre, in pixels: [N, H, W].
    dx = (coords[None, None, :] - attributes["centre"][:, 0, None, None]) * size
    dy = (coords[None, :, None] - attributes["centre"][:, 1, None, None]) * size
    r = attributes["radius"][:, None, None] * size
    dist = np.hypot(dx, dy)
    adx, ady = np.abs(dx), np.abs(dy)
    arm = 0.32 * r
    # Approximate signed distances (pixels, negative inside) of all four shapes; the label picks one.
    sdf = np.stack(
        [
            dist - r,
            np.maximum(adx, ady) - 0.82 * r,
            np.abs(dist - 0.72 * r) - 0.28 * r,
            np.minimum(np.maximum(adx - arm, ady - r), np.maximum(ady - arm, adx - r)),
        ]
    )
    sdf = sdf[attributes["labels"], np.arange(num)]
    # One pixel of linear ramp across the edge: anti-aliased coverage in [0, 1].
    coverage = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    direction = np.stack([np.cos(attributes["angle"]), np.sin(attributes["angle"])], axis=1)
    ramp = (coords[None, None, :] - 0.5) * direction[:, 0, None, None] + (coords[None, :, None] - 0.5) * direction[
        :, 1, None, None
    ]
    ramp = np.clip(ramp / np.sqrt(2) + 0.5, 0.0, 1.0)[..., None]
    background = attributes["bg_a"][:, None, None, :] * (1 - ramp) + attributes["bg_b"][:, None, None, :] * ramp
    image = background * (1 - coverage) + attributes["fg"][:, None, None, :] * coverage
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def make_images(domain: str, num: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`num` images of `domain`: (uint8 [N, size, size, 3], int64 labels [N] in [0, NUM_CLASSES))."""
    attributes = sample_attributes(domain, num, seed)
    return render(attributes, size), attributes["labels"].astype(np.int64)


def normalised_attributes(attributes: dict[str, np.ndarray]) -> np.ndarray:
    """The scalar attributes [N, len(ATTRIBUTE_NAMES)] scaled to about [0, 1] (regression targets)."""
    bg_mean = (attributes["bg_a"] + attributes["bg_b"]) / 2
    radius = (attributes["radius"] - 0.2) / 0.2
    return np.concatenate(
        [attributes["centre"], radius[:, None], attributes["fg"], bg_mean], axis=1, dtype=np.float32
    ).astype(np.float32)


def has_dark_background(images: np.ndarray) -> np.ndarray:
    """[N] bool: whether each uint8 [N, H, W, 3] image has a dark background (its four corners), a SOURCE-only style
    (target backgrounds are light), so the share of such samples measures source style leaking into the target."""
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float64)
    return corners.mean(axis=(1, 2)) < 100


def class_folder_names() -> list[str]:
    """Class folder names whose sorted order is the label order (ImageFolder readers sort folder names)."""
    return [f"{i}_{name}" for i, name in enumerate(CLASS_NAMES)]


def write_image_folder(domain: str, folder: str | Path, num_per_class: int, seed: int, size: int = 16) -> Path:
    """An ImageFolder layout of PNGs: `folder/<i>_<class>/<domain>_<n>.png`, `num_per_class` images per class."""
    folder = Path(folder)
    names = class_folder_names()
    counts = [0] * NUM_CLASSES
    batch_seed = seed
    # Draw batches until every class is full; each batch has its own seed so the result stays deterministic.
    while min(counts) < num_per_class:
        images, labels = make_images(domain, 4 * num_per_class * NUM_CLASSES, batch_seed, size)
        for image, label in zip(images, labels):
            if counts[label] >= num_per_class:
                continue
            class_dir = folder / names[label]
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(class_dir / f"{domain}_{counts[label]:05d}.png")
            counts[label] += 1
        batch_seed += 1_000_003
    return folder


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns [N, 3]."""
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ]
    )
    return table[i, np.arange(len(h))]
