"""scikit-learn's handwritten digits (1797 8x8 images, 0-16 grey levels) for the digits experiment.

Every class is split once, by a fixed seed, into a training pool and a held-out half: the source model and the
classifier learn from the pools, the target's few images per class come from the pool of digits 5-9, and every
measurement is taken on the held-out halves. Images are uint8 [N, 8, 8, 3] (grey replicated to RGB, so that the
project's image jobs and feature nets take them unchanged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SPLIT_SEED = 1234


def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 8, 8, 3] images, int64 [N] digits) of the whole data set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits experiment needs scikit-learn: `pip install -c constraints.txt -e '.[experiments]'` "
            "(or `make experiment`, which installs it)"
        ) from None
    data = load_digits()
    grey = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), data.target.astype(np.int64)


def split(digits: tuple[int, ...], part: str) -> tuple[np.ndarray, np.ndarray]:
    """`part` = "pool" (first half of each class, shuffled once) or "heldout" (the rest), of `digits` only."""
    if part not in ("pool", "heldout"):
        raise ValueError(f"part={part!r} must be 'pool' or 'heldout'")
    images, labels = load_digits_rgb()
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for digit in digits:
        index = rng.permutation(np.flatnonzero(labels == digit))
        half = len(index) // 2
        chosen.append(index[:half] if part == "pool" else index[half:])
    index = np.concatenate(chosen)
    return images[index], labels[index]


def few_shot(digits: tuple[int, ...], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each digit, drawn from the training pool with `seed`."""
    images, labels = split(digits, "pool")
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in digits:
        index = np.flatnonzero(labels == digit)
        if per_class > len(index):
            raise ValueError(f"{per_class} images per class asked but the pool of digit {digit} has {len(index)}")
        chosen.append(rng.choice(index, per_class, replace=False))
    index = np.concatenate(chosen)
    return images[index], labels[index]


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """An ImageFolder (one subfolder per digit, named by the digit) of PNGs: what prepare_data.py reads."""
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(int(label)) / f"{i:05d}.png")
    return folder
