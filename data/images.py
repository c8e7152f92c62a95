"""Pure image helpers for preparing target data: list an ImageFolder, check, load, crop and flip images.

Every file is decoded as it is meant to be seen (`upright_8bit`): EXIF orientation applied (phone cameras store
the sensor's pixels sideways with a tag saying how to turn them) and 16-bit greyscale scaled to 8 bits (PIL's
convert() clips every value above 255, so a 16-bit PNG would come out nearly white). 16-bit RGB(A) PNGs are
opened by PIL at 8 bits already (it keeps the high byte); CMYK and YCbCr JPEGs, palettes and 1-bit images go
through PIL's own conversion to RGB (CMYK without its ICC profile: a print profile's colours come out approximate).
Images with transparency (RGBA, LA, a palette or colour key with a transparent entry) are composited onto a
background colour (prepare.background): a plain convert("RGB") drops the alpha channel, and every transparent
pixel would silently take whatever colour it stores, usually black."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageColor, ImageOps

# What torchvision's ImageFolder accepts; other files are listed as ignored, never silently read or dropped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
WHITE = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# One channel of 16-bit values (PIL's 16-bit PNG and TIFF modes; "I" is how PIL may open 16-bit greyscale too).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Orientations 5-8 turn the image by 90 degrees: width and height swap.
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def parse_background(value: str) -> tuple[int, int, int]:
    """A colour name or #RRGGBB (PIL's ImageColor), or "R,G,B" with integers in 0..255, as an RGB triple."""
    text = str(value).strip()
    if "," in text:
        parts = text.split(",")
        if len(parts) == 3 and all(part.strip().isdigit() and int(part) <= 255 for part in parts):
            return tuple(int(part) for part in parts)
        raise ValueError(f"{value!r} is not R,G,B with three integers in 0..255")
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"{value!r} is not a colour name (white, black, ...), #RRGGBB or R,G,B") from None


def has_transparency(image: Image.Image) -> bool:
    """Whether the image carries an alpha channel or a transparent palette entry / colour key."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def upright_8bit(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation, 16-bit greyscale scaled to 8-bit L (value / 257, rounded:
    65535 -> 255, 257 k -> k); a 16-bit colour key becomes an alpha channel (LA). Other modes are returned as
    they are (to_rgb converts them)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # (exif_transpose would copy every other image)
        image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # 32-bit float: no range to scale from
        raise ValueError("32-bit float images have no defined value range: save them as 8- or 16-bit images")
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    grey = Image.fromarray(np.clip((values + 128) // 257, 0, 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int):  # a 16-bit PNG's tRNS: pixels equal to the key are transparent
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (grey, alpha))
    return grey


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once upright_8bit applied the EXIF orientation, read from the header only."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return image.size[::-1] if orientation in SWAPPING_ORIENTATIONS else image.size


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image upright as RGB (see upright_8bit), any transparency composited onto `background`."""
    image = upright_8bit(image)
    if not has_transparency(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


@dataclass(frozen=True)
class ImageFolderListing:
    root: Path
    classes: list[str]  # sorted subfolder names; a label is a position in this list
    files: list[tuple[str, int]]  # (path relative to root, label), sorted by (label, path)
    ignored: list[str]  # files without an image extension, relative to root


def list_image_folder(root: str | Path) -> ImageFolderListing:
    """One subfolder per class (walked recursively, hidden entries skipped); raises naming an empty class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"prepare.images={root} is not a folder: point it to an ImageFolder layout")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"prepare.images={root} has no class subfolders: put each class's images in root/<class>/")
    files, ignored = [], []
    for label, name in enumerate(classes):
        found = []
        for folder, subfolders, filenames in os.walk(root / name):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for filename in filenames:
                if filename.startswith("."):
                    continue
                relative = (Path(folder) / filename).relative_to(root).as_posix()
                (found if filename.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(relative)
        if not found:
            raise ValueError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        files.extend((relative, label) for relative in sorted(found))
    return ImageFolderListing(root, classes, files, sorted(ignored))


def scan_image(path: str | Path) -> tuple[str | None, bool]:
    """(None if the image decodes completely else why not, whether some pixel is not fully opaque). verify()
    catches a bad header and load() a truncated body; anything PIL raises (incl. decompression bombs) marks
    the file unreadable."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image = upright_8bit(image)
            if not has_transparency(image):
                image.convert("RGB").load()
                return None, False
            alpha_min, _ = image.convert("RGBA").getchannel("A").getextrema()
    except Exception as err:  # noqa: BLE001 - one bad file must not stop a job over a million images
        return f"{type(err).__name__}: {err}", False
    return None, alpha_min < 255


def check_image(path: str | Path) -> str | None:
    """None if the image decodes completely, else why not."""
    return scan_image(path)[0]


def scan_images(paths: list[Path], num_threads: int = 8) -> list[tuple[str | None, bool]]:
    """scan_image over many files; PIL decodes outside the GIL, so threads help."""
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return list(pool.map(scan_image, paths))


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """DiT's preprocessing: halve with a box filter while the short side is at least 2*size (cheap and
    alias-free), resize bicubically so that the short side is `size`, then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """An RGB image (transparency composited onto `background`) centre-cropped to size x size, as float32 CHW
    in [-1, 1]."""
    with Image.open(path) as image:
        image = center_crop_arr(to_rgb(image, background), size)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror a CHW image left-right."""
    return np.ascontiguousarray(image[..., ::-1])


def load_images(
    paths: list[Path], size: int, num_threads: int = 8, background: tuple[int, int, int] = WHITE
) -> np.ndarray:
    """load_image over a batch, (B, 3, size, size); decoding and resizing release the GIL."""

    def load(path: Path) -> np.ndarray:
        try:
            return load_image(path, size, background)
        except Exception as err:  # it passed check_image, so it changed since: name it
            raise ValueError(f"image {path} can no longer be read ({err}); it changed during the job") from err

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return np.stack(list(pool.map(load, paths)))


# --- image, caption and control triples (ControlNet data) -----------------------------------------------------------
INDEX_NAME = "index.jsonl"
# 1 or 3 channels once converted (palette maps, e.g. segmentation, to RGB; 16-bit maps, e.g. depth, to 8-bit L)
CONTROL_MODES = ("L", "RGB", "1", "P", *SIXTEEN_BIT_MODES)


@dataclass(frozen=True)
class CaptionListing:
    root: Path
    index: Path
    entries: list[dict]  # {"image", "caption", "control" (None: annotate)} in the index's order; paths relative to root


def list_caption_folder(root: str | Path) -> CaptionListing:
    """A folder with index.jsonl, one `{"image": "a.png", "caption": "...", "control": "a_canny.png"}` per line."""
    root = Path(root)
    index = root / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(
            f"prepare.images={root} has no {INDEX_NAME}: ControlNet data is a folder with one JSON object per line, "
            '{"image": "a.png", "caption": "...", "control": "a_control.png"} (control optional when annotated)'
        )
    entries = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{index} line {number} is not JSON ({err})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f'{index} line {number} needs an "image" path: {line[:200]}')
        caption, control = entry.get("caption", ""), entry.get("control")
        if not isinstance(caption, str) or not (control is None or isinstance(control, str)):
            raise ValueError(f'{index} line {number}: "caption" and "control" must be strings: {line[:200]}')
        entries.append({"image": entry["image"], "caption": caption, "control": control})
    if not entries:
        raise ValueError(f"{index} lists no samples")
    return CaptionListing(root, index, entries)


def check_control(image_path: str | Path, control_path: str | Path) -> str | None:
    """None if the control map has its image's size and 1 or 3 channels, else why not (both must be readable)."""
    with Image.open(image_path) as image, Image.open(control_path) as control:
        (w, h), (cw, ch) = oriented_size(image), oriented_size(control)  # both are loaded upright
        if (cw, ch) != (w, h):
            return f"its control map is {cw}x{ch} but the image is {w}x{h}: annotate the image at its own size"
        if control.mode not in CONTROL_MODES:
            channels = len(control.getbands())
            return f"its control map has mode {control.mode} ({channels} channels): give L (1) or RGB (3) maps"
    return None


def square_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """The centre square, resized to size x size: one geometry for an image and its control map."""
    side = min(image.size)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample=resample)


def load_image_and_control(
    image_path: Path, control_path: Path | None, size: int, nearest: bool, background: tuple[int, int, int] = WHITE
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as uint8 (size, size, 3) (transparency composited onto `background`) and its control map (if
    any) cropped alike: nearest-neighbour for maps whose values are labels (segmentation), bilinear for the others."""
    with Image.open(image_path) as image:
        pixels = np.asarray(square_crop(to_rgb(image, background), size, Image.BICUBIC))
    if control_path is None:
        return pixels, None
    with Image.open(control_path) as control:
        control = upright_8bit(control)
        control = control.convert("RGB" if control.mode in ("P", "RGB") else "L")
        control = np.asarray(square_crop(control, size, Image.NEAREST if nearest else Image.BILINEAR))
    return pixels, control
