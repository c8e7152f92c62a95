"""Control maps for ControlNet: Canny built in (OpenCV), the other controls from the user.

A control map is uint8 (H, W, 3): one-channel maps (edges, sketch, depth) are replicated to three channels,
as ControlNet's own datasets do. Sketch (HED), depth (MiDaS), normal and segmentation maps come prepared with
the data, or from an annotator the user points to: a local Python file with a function
`annotate(image: uint8 (H, W, 3)) -> uint8 (H, W) or (H, W, 3)`, given as `path/to/file.py[:function]`.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

CONTROLS = ("canny", "sketch", "depth", "normal", "seg")
CANNY_THRESHOLDS = (100, 200)  # ControlNet's defaults
Annotator = Callable[[np.ndarray], np.ndarray]


def canny(image: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges of an RGB uint8 image, white on black, as a 3-channel map."""
    return as_control(cv2.Canny(np.ascontiguousarray(image), low, high), image.shape[:2], "canny edges")


def as_control(array: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    """Checks a control map and returns it as uint8 (H, W, 3); ValueError naming `name` when it does not fit."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"control map of {name} has shape {array.shape}: it needs 1 or 3 channels, (H, W), (H, W, 1) or (H, W, 3)"
        )
    if array.shape[:2] != tuple(size):
        raise ValueError(
            f"control map of {name} is {array.shape[1]}x{array.shape[0]} (WxH) but its image is "
            f"{size[1]}x{size[0]}: the control must be annotated from the same image, at the same size"
        )
    if array.dtype != np.uint8:
        raise ValueError(f"control map of {name} is {array.dtype}: control maps are uint8 images (0-255)")
    return np.ascontiguousarray(array)


def load_annotator(spec: str) -> Annotator:
    """The function named by `path/to/file.py[:function]` (default function: `annotate`), imported from the file."""
    path, _, function = spec.partition(":")
    path, function = Path(path), function or "annotate"
    if not path.is_file():
        raise FileNotFoundError(
            f"model.sd_controlnet.annotator={spec}: {path} is not a file; give path/to/module.py[:function]"
        )
    module_spec = importlib.util.spec_from_file_location(f"difftune_annotator_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # lets the module's own dataclasses and pickles resolve
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
        raise ValueError(f"model.sd_controlnet.annotator={spec}: {path} has no function {function!r}")
    return getattr(module, function)


def annotator_for(control: str, spec: str | None, canny_thresholds=CANNY_THRESHOLDS) -> Annotator | None:
    """The annotator of a control: the user's if given, Canny for edges, else None (maps must come with data)."""
    if control not in CONTROLS:
        raise ValueError(f"model.sd_controlnet.control={control!r} is not one of {CONTROLS}")
    if spec:
        return load_annotator(spec)
    if control == "canny":
        low, high = canny_thresholds
        return lambda image: canny(image, low, high)
    return None


def annotate_batch(annotate: Annotator, images: np.ndarray) -> np.ndarray:
    """Annotates uint8 (N, H, W, 3) images one by one into checked (N, H, W, 3) control maps."""
    return np.stack(
        [as_control(annotate(np.ascontiguousarray(x)), x.shape[:2], "the annotator's output") for x in images]
    )


def to_uint8(images) -> np.ndarray:
    """Pixels in [-1, 1], (N, 3, H, W) tensor or array -> uint8 (N, H, W, 3)."""
    x = np.asarray(images.detach().float().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def synthetic_controls(num: int, size: int, seed: int = 0) -> np.ndarray:
    """Fixed outline drawings (circles, rectangles, lines) as (num, size, size, 3) uint8 maps, for previews."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((num, size, size, 3), dtype=np.uint8)
    width = max(1, size // 64)
    for canvas in maps:
        for _ in range(3):
            a, b = (rng.integers(size // 8, size - size // 8, 2) for _ in range(2))
            kind = rng.integers(3)
            if kind == 0:
                cv2.circle(
                    canvas, tuple(int(v) for v in a), int(rng.integers(size // 10, size // 3)), (255,) * 3, width
                )
            elif kind == 1:
                cv2.rectangle(canvas, tuple(int(v) for v in a), tuple(int(v) for v in b), (255,) * 3, width)
            else:
                cv2.line(canvas, tuple(int(v) for v in a), tuple(int(v) for v in b), (255,) * 3, width)
    return maps
