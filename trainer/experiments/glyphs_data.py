"""The glyph data set: Latin letters (the source) and Greek capitals (the target) rendered from Debian font packages.

- **source**: the 52 Latin letters A-Z, a-z (labels 0-51 in that order) in every usable face on the machine but
  the decorative control's.
- **control**: the same 52 letters in one held-out decorative design (Cabin Sketch), in none of the other splits:
  a style shift of fine detail only, for a negative control.
- **target_train / target_val / target_heldout**: the 10 Greek capitals with no Latin look-alike, `GREEK`
  (labels 0-9 in that order, a label space of their own), one image per class and face. target_train has 10 faces
  (100 images) from 10 different designs; target_val is for tuning, target_heldout for reporting. The three are
  disjoint by *design* (`design_of`), not only by face: a bold face, a condensed width or a metric clone of
  another package's font (Arimo = Liberation Sans, TeX Gyre Heros = Nimbus Sans = FreeSans, ...) shares its
  drawing, so a held-out face of a training design would test memory, not transfer.

Images are grey uint8 [N, S, S], 0 = background and 255 = full ink (as scikit-learn's digits); `load_glyphs`
replicates them to RGB [N, S, S, 3] by default, as `data/digits.py` does, so the project's image jobs take them.
Every face is drawn with one scale for all its letters, the scale that fits its largest letter (from the highest
ascender to the lowest descender, and the widest letter) into the S - 2 px box: scaling each letter on its own would
make o/O, s/S, x/X, ... the same image and Latin and Greek capitals different sizes. Each letter is centred
horizontally by its ink box and sits on the face's baseline, placed so that the face's full height is centred.
Rendering is done at `RENDER_PX` pixels per em and area-averaged down, with Pillow's basic layout (no shaping
library, so machines with and without raqm draw the same pixels).

A face is kept when it maps all 52 letters in its cmap to a real glyph: not `.notdef`, not empty, and not the same
bitmap as a code point the face lacks (which FreeType draws as its missing-glyph box). It counts as Greek-capable
when the same holds for the 10 capitals. `EXCLUDED` lists the faces that pass that test but do not draw plain
letters (dingbats, keycaps, small capitals, an uncial display face, hairlines too thin to see at 16 px). Splits are
drawn with `SPLIT_SEED` from the sorted face list, so the same fonts give the same data set, byte for byte with the
same Pillow and FreeType (their versions and the arrays' sha256 sums are in `info.json`).

    .venv/bin/python launch/make_glyph_data.py --overwrite              # assets/glyphs/glyphs16.npz
    .venv/bin/python launch/make_glyph_data.py --size 24                # adds glyphs24.npz, same fonts and splits

Shipped at 16 px (1.2 MB): source 298 faces (15,496 images), control 2 faces (104), target_train 10 faces of 10
designs (100), target_val 44 faces of 7 designs (440), target_heldout 164 faces of 20 designs (1,640). The fonts
are needed only to rebuild (`apt-get install` the Debian packages in `PACKAGES`); `info.json` lists every face
with its file, package, licence and design, per split.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import io
import json
import math
import os
import re
import string
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets" / "glyphs"
LATIN = string.ascii_uppercase + string.ascii_lowercase
GREEK = "ΓΔΘΛΞΠΣΦΨΩ"
SPLITS = ("source", "control", "target_train", "target_val", "target_heldout")
SPLIT_SEED = 1234
RENDER_PX = 256
MARGIN_PX = 1
FONT_DIRS = ("/usr/share/fonts", "/usr/share/texmf/fonts/opentype")  # TeX Gyre lives under texmf
PACKAGES = (
    "fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 fonts-texgyre "
    "fonts-croscore fonts-cmu fonts-linuxlibertine fonts-lato fonts-go fonts-gfs-artemisia fonts-gfs-baskerville "
    "fonts-gfs-bodoni-classic fonts-gfs-didot fonts-gfs-didot-classic fonts-gfs-neohellenic fonts-gfs-olga "
    "fonts-gfs-porson fonts-gfs-solomos fonts-gfs-complutum fonts-gfs-gazis fonts-gfs-theokritos "
    "fonts-sil-gentiumplus fonts-sil-andika fonts-sil-galatia fonts-ebgaramond fonts-oldstandard fonts-open-sans "
    "fonts-roboto-unhinted fonts-crosextra-caladea fonts-crosextra-carlito fonts-cantarell fonts-cardo fonts-stix "
    "fonts-droid-fallback fonts-noto-mono fonts-comfortaa fonts-play fonts-tuffy fonts-cabinsketch "
    "fonts-mph-2b-damase"
)
CONTROL_DESIGN = "Cabin Sketch"
# PostScript-name patterns of faces that map the letters but do not draw them as letters.
EXCLUDED = {
    r"D050000L": "dingbats",
    r"StandardSymbolsPS": "symbol font: its Latin code points carry Greek and math shapes",
    r"LinBiolinumOKb": "keyboard keycaps: each letter is drawn inside a key outline",
    r"GoSmallcaps": "small capitals: the lowercase letters are drawn as capitals",
    r"GFSTheokritos": "decorative: uncial Latin letters, its capital omega drawn as a small one",
    r"Lato-Hairline|Cantarell-Thin": "hairline strokes: at 16 px the letters are grey ghosts (peak ink ~40 of 255)",
}
# PostScript-name prefixes of one drawing under several names: weights and widths of a family, and the clones
# that other packages ship (URW's base 35, their TeX Gyre and GNU FreeFont derivatives, the croscore fonts).
# A name matching none is its own design (the PostScript family, before the '-').
DESIGNS = (
    (r"LiberationSans|Arimo", "Liberation Sans"),
    (r"LiberationSerif|Tinos", "Liberation Serif"),
    (r"LiberationMono|Cousine", "Liberation Mono"),
    (r"NimbusSans|TeXGyreHeros|FreeSans", "Nimbus Sans"),
    (r"NimbusRoman|TeXGyreTermes|FreeSerif", "Nimbus Roman"),
    (r"NimbusMono|TeXGyreCursor|FreeMono", "Nimbus Mono"),
    (r"P052|TeXGyrePagella", "P052"),
    (r"URWBookman|TeXGyreBonum", "URW Bookman"),
    (r"C059|TeXGyreSchola", "C059"),
    (r"URWGothic|TeXGyreAdventor", "URW Gothic"),
    (r"Z003|TeXGyreChorus", "Z003"),
    (r"Lato|Carlito", "Lato"),  # Carlito is drawn from Lato
    (r"OpenSans|DroidSans", "Open Sans"),  # Open Sans is drawn from Droid Sans
    (r"Roboto", "Roboto"),
    (r"DejaVuSans", "DejaVu Sans"),
    (r"DejaVuSerif|DejaVuMath", "DejaVu Serif"),
    (r"Go(Regular|Medium|Mono|Smallcaps)?(-|$)", "Go"),
    (r"CMU(Serif|ClassicalSerif|Concrete)", "CMU Serif"),
    (r"CMU(SansSerif|Bright)", "CMU Sans Serif"),
    (r"CMUTypewriter", "CMU Typewriter"),
    (r"LinLibertine", "Linux Libertine"),
    (r"LinBiolinum", "Linux Biolinum"),
    (r"NotoMono|NotoSansMono", "Noto Mono"),
    (r"Gentium", "Gentium"),
    (r"STIX", "STIX"),
    (r"EBGaramond", "EB Garamond"),
    (r"CabinSketch", "Cabin Sketch"),
)


@dataclass(frozen=True)
class Face:
    name: str  # the full name (name table id 4), unique in the data set
    postscript: str
    path: str
    design: str
    greek: bool


def design_of(postscript: str) -> str:
    """The drawing a face belongs to: its family with weights, widths and other packages' clones folded in."""
    for pattern, design in DESIGNS:
        if re.match(pattern, postscript):
            return design
    return postscript.split("-")[0]


def font_files(dirs: tuple[str, ...] = FONT_DIRS) -> list[Path]:
    """Every .ttf/.otf file under `dirs`, sorted, a file reached through several links listed once."""
    found: dict[str, Path] = {}
    for root in dirs:
        for folder, _, names in os.walk(root):
            for name in names:
                if name.lower().endswith((".ttf", ".otf")):
                    path = Path(folder) / name
                    found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def _ink(font: ImageFont.FreeTypeFont, char: str) -> tuple[Image.Image, int, int] | None:
    """The glyph's ink, cropped, and its top-left corner relative to the baseline origin; None if it has none."""
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, fill=255, anchor="ls")
    box = canvas.getbbox()
    if box is None:
        return None
    return canvas.crop(box), box[0] - pad + left, box[1] - pad + top


def _cmap(path: Path) -> dict[int, str]:
    from fontTools.ttLib import TTFont  # a dependency of matplotlib, itself one of the project's

    return TTFont(str(path), lazy=True).getBestCmap() or {}


def _drawn(path: Path, chars: str, cmap: dict[int, str]) -> dict[str, tuple[Image.Image, int, int]] | None:
    """The ink of each of `chars`, or None if any is unmapped, empty or drawn as the face's missing-glyph box."""
    if any(cmap.get(ord(c), ".notdef") == ".notdef" for c in chars):
        return None
    font = ImageFont.truetype(str(path), RENDER_PX, layout_engine=ImageFont.Layout.BASIC)
    missing = next(c for c in ("\U0010fffd", "\ue000", "\uffff", "\u0378") if ord(c) not in cmap)
    notdef = _ink(font, missing)
    inks = {}
    for char in chars:
        ink = _ink(font, char)
        if ink is None or (notdef is not None and ink[0].tobytes() == notdef[0].tobytes()):
            return None
        inks[char] = ink
    return inks


def read_face(path: Path) -> Face | None:
    """The face in `path` if it draws all 52 Latin letters and is not `EXCLUDED`; None otherwise."""
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(str(path), lazy=True)
        cmap = font.getBestCmap() or {}
        names = font["name"]
    except Exception:  # a file FreeType may read but fontTools cannot is not worth a special case
        return None
    postscript, name = (str(names.getName(i, 3, 1, 0x409) or names.getName(i, 1, 0, 0) or "") for i in (6, 4))
    if not postscript or not name or any(re.match(p, postscript) for p in EXCLUDED):
        return None
    if _drawn(path, LATIN, cmap) is None:
        return None
    greek = _drawn(path, GREEK, cmap) is not None
    return Face(name=name, postscript=postscript, path=str(path), design=design_of(postscript), greek=greek)


def find_faces(files: list[Path]) -> list[Face]:
    """The usable faces of `files`, sorted by name; a face shipped twice (.otf and .ttf) is kept once."""
    faces: dict[str, Face] = {}
    for path in files:
        face = read_face(path)
        if face is not None:
            faces.setdefault(face.name, face)
    return sorted(faces.values(), key=lambda f: f.name)


def rasterise(path: str | Path, chars: str, size: int, fit: str | None = None) -> np.ndarray:
    """uint8 [len(chars), size, size] of `chars` in the face at `path`, with the one scale and baseline that fit
    every letter of `fit` (default `chars`) into the box: a face's Latin and Greek images share them."""
    fit = fit or chars
    inks = _drawn(Path(path), "".join(dict.fromkeys(fit + chars)), _cmap(Path(path)))
    if inks is None:
        raise ValueError(f"{path} does not draw all of {fit + chars!r}")
    fitted = [inks[c] for c in fit]
    top = min(y for _, _, y in fitted)
    bottom = max(y + ink.height for ink, _, y in fitted)
    extent = max(bottom - top, max(ink.width for ink, _, _ in fitted))
    side = math.ceil(extent * size / (size - 2 * MARGIN_PX))
    baseline = (side - (top + bottom)) / 2
    out = np.zeros((len(chars), size, size), np.uint8)
    for i, char in enumerate(chars):
        ink, _, y = inks[char]
        canvas = Image.new("L", (side, side))
        canvas.paste(ink, (round((side - ink.width) / 2), round(baseline + y)))
        out[i] = np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
    return out


def assign_splits(
    faces: list[Face], seed: int = SPLIT_SEED, train_fonts: int = 10, val_fonts: int = 40
) -> dict[str, list[Face]]:
    """Faces per split. Greek splits are disjoint by design: `train_fonts` designs give one face each to
    target_train; the next designs (in a seeded order) give all their faces to target_val until it has at least
    `val_fonts`; every face of the remaining designs goes to target_heldout."""
    control = [f for f in faces if f.design == CONTROL_DESIGN]
    source = [f for f in faces if f.design != CONTROL_DESIGN]
    by_design: dict[str, list[Face]] = {}
    for face in source:
        if face.greek:
            by_design.setdefault(face.design, []).append(face)
    designs = sorted(by_design)
    rng = np.random.default_rng(seed)
    order = [designs[i] for i in rng.permutation(len(designs))]
    if len(order) < train_fonts + 2:
        raise ValueError(f"{len(order)} Greek-capable designs; target_train, _val and _heldout need {train_fonts + 2}")
    train = [by_design[d][rng.integers(len(by_design[d]))] for d in order[:train_fonts]]
    rest, val = order[train_fonts:], []
    while rest[1:] and len(val) < val_fonts:
        val += by_design[rest.pop(0)]
    heldout = [f for d in rest for f in by_design[d]]
    splits = {"source": source, "control": control, "target_train": train, "target_val": val, "target_heldout": heldout}
    return {k: sorted(v, key=lambda f: f.name) for k, v in splits.items()}


def render_splits(splits: dict[str, list[Face]], size: int) -> dict[str, np.ndarray]:
    """The arrays of the .npz: images_<split> uint8 [N, size, size], labels_<split> int64 [N] and fonts_<split>
    (int16 [N], an index into font_names), and the class and font tables."""
    names = sorted({f.name for faces in splits.values() for f in faces})
    index = {n: i for i, n in enumerate(names)}
    arrays: dict[str, np.ndarray] = {
        "latin_classes": np.array(list(LATIN)),
        "greek_classes": np.array(list(GREEK)),
        "font_names": np.array(names),
    }
    for split, faces in splits.items():
        chars = LATIN if split in ("source", "control") else GREEK
        images = [rasterise(f.path, chars, size, fit=LATIN + GREEK if f.greek else LATIN) for f in faces]
        arrays[f"images_{split}"] = np.concatenate(images) if images else np.zeros((0, size, size), np.uint8)
        arrays[f"labels_{split}"] = np.tile(np.arange(len(chars), dtype=np.int64), len(faces))
        arrays[f"fonts_{split}"] = np.repeat(np.array([index[f.name] for f in faces], np.int16), len(chars))
    return arrays


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format with fixed zip timestamps, so that the same arrays give the same file bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue(), compresslevel=9)


def debian_package(paths: list[str]) -> dict[str, str]:
    """The Debian package that owns each path (dpkg-query), "unknown" where there is none."""
    try:
        out = subprocess.run(["dpkg-query", "-S", *paths], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    owners = {}
    for line in out.splitlines():
        package, _, path = line.partition(": ")
        owners[path.strip()] = package.split(":")[0]
    return {p: owners.get(p, owners.get(os.path.realpath(p), "unknown")) for p in paths}


def licence(package: str, path: str) -> str:
    """The licence /usr/share/doc/<package>/copyright gives for `path`: the License of the last machine-readable
    Files stanza that matches it, or the SIL OFL version a free-form file names."""
    try:
        text = (Path("/usr/share/doc") / package / "copyright").read_text(errors="replace")
    except OSError:
        return "unknown"
    found = None
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", stanza, re.M)
        name = re.search(r"^License:[ \t]*(.+)", stanza, re.M)
        if files and name:
            patterns = [p for p in files.group(1).split() if not p.startswith("debian/")]
            # the patterns name the source tree, not the installed one: "*.ttf" and "*" match any font,
            # "hinted/*" only a path with a hinted/ folder, "appstream/*" none
            if any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, f"*/{p}") for p in patterns):
                found = name.group(1).strip()
    if found:
        return found
    ofl = re.search(r"SIL Open Font License, Version (\d\.\d)", text)
    if ofl:
        return f"OFL-{ofl.group(1)}"
    name = re.search(r"^License:[ \t]*(.+)", text, re.M)
    return name.group(1).strip() if name else "see copyright"


def font_table(faces: list[Face]) -> dict[str, dict]:
    packages = debian_package([f.path for f in faces])
    return {
        f.name: {
            "file": f.path, "package": packages[f.path], "licence": licence(packages[f.path], f.path),
            "design": f.design, "greek": f.greek,
        }
        for f in faces
    }  # fmt: skip


def npz_name(size: int) -> str:
    return f"glyphs{size}.npz"


@functools.lru_cache(maxsize=4)
def _arrays(root: str, size: int) -> dict[str, np.ndarray]:
    with np.load(Path(root) / npz_name(size), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_glyphs(
    split: str, size: int = 16, rgb: bool = True, root: str | Path = ASSETS
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, int64 labels) of `split`: [N, size, size, 3] (grey replicated) or [N, size, size] with
    rgb=False; 0 is background. Labels index `LATIN` (source, control) or `GREEK` (target_*)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    arrays = _arrays(str(root), size)
    images = arrays[f"images_{split}"]
    images = np.repeat(images[..., None], 3, axis=-1) if rgb else images.copy()
    return images, arrays[f"labels_{split}"].copy()


def load_glyph_fonts(split: str, size: int = 16, root: str | Path = ASSETS) -> np.ndarray:
    """The face name of every image of `split`, aligned with `load_glyphs`."""
    arrays = _arrays(str(root), size)
    return arrays["font_names"][arrays[f"fonts_{split}"]]


def split_summary(splits: dict[str, list[Face]], arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    return {
        split: {
            "images": len(arrays[f"labels_{split}"]), "fonts": len(faces),
            "designs": sorted({f.design for f in faces}), "font_names": [f.name for f in faces],
        }
        for split, faces in splits.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="seed of the Greek splits")
    parser.add_argument("--overwrite", action="store_true", help="replace this size's file and the font lists")
    args = parser.parse_args()
    out = Path(args.out)
    info_path, npz_path = out / "info.json", out / npz_name(args.size)
    if npz_path.exists() and not args.overwrite:
        raise SystemExit(f"error: {npz_path} exists; pass --overwrite to rebuild it")

    faces = find_faces(font_files())
    splits = assign_splits(faces, seed=args.seed)
    arrays = render_splits(splits, args.size)
    summary = split_summary(splits, arrays)
    print(json.dumps({k: {"images": v["images"], "fonts": v["fonts"]} for k, v in summary.items()}), flush=True)

    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("splits") not in (None, summary) and not args.overwrite:
        raise SystemExit(f"error: the installed fonts give other splits than {info_path}; pass --overwrite")
    if info.get("splits") != summary:
        info["files"] = {}  # other sizes were drawn from other fonts: they no longer match
    used = [f for faces_ in splits.values() for f in faces_]
    info.update(
        description="Latin letters (source, control) and Greek capitals (target_*) rendered from Debian font "
        "packages; see trainer/experiments/glyphs_data.py",
        pixels="grey uint8, 0 = background, 255 = full ink; load_glyphs replicates to RGB",
        classes={"latin": LATIN, "greek": GREEK},
        split_seed=args.seed,
        rendering={
            "render_px_per_em": RENDER_PX, "margin_px": MARGIN_PX, "layout": "Pillow basic (no raqm)",
            "downsampling": "area (box)", "pillow": Image.__version__, "freetype": features.version("freetype2"),
        },
        excluded=EXCLUDED,
        splits=summary,
        fonts=font_table(sorted(used, key=lambda f: f.name)),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_npz(npz_path, arrays)
    info.setdefault("files", {})[npz_path.name] = {
        "command": " ".join([".venv/bin/python launch/make_glyph_data.py", *sys.argv[1:]]),
        "size": args.size,
        "bytes": npz_path.stat().st_size,
        "sha256": hashlib.sha256(npz_path.read_bytes()).hexdigest(),
        "arrays": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": array_sha256(v)} for k, v in arrays.items()
        },
    }
    info["files"] = dict(sorted(info["files"].items()))
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {npz_path} ({npz_path.stat().st_size / 1e6:.2f} MB) and {info_path}")


if __name__ == "__main__":
    main()
