"""The glyph data set: the shipped arrays agree with info.json, the splits are disjoint, the builder is repeatable."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from trainer.experiments import glyphs_data

ASSETS = glyphs_data.ASSETS
INFO = json.loads((ASSETS / "info.json").read_text())
TARGETS = ("target_train", "target_val", "target_heldout")


def test_shipped_arrays_are_what_info_json_says():
    entry = INFO["files"]["glyphs16.npz"]
    path = ASSETS / "glyphs16.npz"
    assert path.stat().st_size == entry["bytes"] <= 5_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(entry["arrays"])
        for name, described in entry["arrays"].items():
            assert list(data[name].shape) == described["shape"] and str(data[name].dtype) == described["dtype"]
            assert glyphs_data.array_sha256(data[name]) == described["sha256"], name
    for split in glyphs_data.SPLITS:
        summary = INFO["splits"][split]
        images, labels = glyphs_data.load_glyphs(split)
        grey, _ = glyphs_data.load_glyphs(split, rgb=False)
        fonts = glyphs_data.load_glyph_fonts(split)
        classes = 52 if split in ("source", "control") else 10
        assert images.shape == (summary["images"], 16, 16, 3) and images.dtype == np.uint8
        assert grey.shape == (summary["images"], 16, 16) and np.array_equal(images[..., 1], grey)
        assert labels.dtype == np.int64 and len(labels) == len(fonts) == summary["images"]
        assert summary["images"] == classes * summary["fonts"]  # one image per class and face
        assert sorted(set(fonts.tolist())) == summary["font_names"]
        assert np.array_equal(np.bincount(labels, minlength=classes), np.full(classes, summary["fonts"]))
        # 0 is the background: the border is nearly empty, every image has ink
        assert grey[:, 0, :].mean() < 8 and (grey.reshape(len(grey), -1).max(1) > 50).all()
    with pytest.raises(ValueError, match="split="):
        glyphs_data.load_glyphs("greek")


def test_sizes_the_issue_asks_for():
    splits = INFO["splits"]
    assert splits["source"]["fonts"] >= 250
    assert splits["target_train"]["fonts"] == 10 and splits["target_train"]["images"] == 100
    assert len(splits["target_train"]["designs"]) == 10  # ten drawings, not ten weights of one
    assert splits["target_heldout"]["images"] >= 1200 and splits["target_heldout"]["fonts"] >= 60
    assert splits["control"]["designs"] == [glyphs_data.CONTROL_DESIGN]


def test_splits_fonts_and_designs_are_disjoint():
    splits = INFO["splits"]
    fonts = {k: set(v["font_names"]) for k, v in splits.items()}
    assert not fonts["source"] & fonts["control"]
    assert not set(splits["source"]["designs"]) & set(splits["control"]["designs"])
    for i, a in enumerate(TARGETS):
        for b in TARGETS[i + 1 :]:
            assert not fonts[a] & fonts[b], (a, b)
            assert not set(splits[a]["designs"]) & set(splits[b]["designs"]), (a, b)
    # the Greek faces are a subset of the Latin ones: the source model has seen each target face's Latin letters
    assert set().union(*(fonts[k] for k in TARGETS)) <= fonts["source"]
    for name in set().union(*fonts.values()):
        entry = INFO["fonts"][name]
        assert entry["package"].startswith("fonts-") and entry["licence"] not in ("unknown", "see copyright"), name


def test_classes_are_the_letters_asked_for():
    assert glyphs_data.GREEK == "ΓΔΘΛΞΠΣΦΨΩ" and len(set(glyphs_data.GREEK)) == 10
    assert INFO["classes"] == {"latin": glyphs_data.LATIN, "greek": glyphs_data.GREEK}
    arrays = glyphs_data._arrays(str(ASSETS), 16)
    assert arrays["greek_classes"].tolist() == list("ΓΔΘΛΞΠΣΦΨΩ")
    assert "".join(arrays["latin_classes"].tolist()) == "".join(map(chr, [*range(65, 91), *range(97, 123)]))


def test_design_folds_weights_and_clones():
    assert glyphs_data.design_of("Arimo-BoldItalic") == glyphs_data.design_of("LiberationSans-Regular")
    assert glyphs_data.design_of("FreeSansBold") == glyphs_data.design_of("TeXGyreHerosCondensed-Bold")
    assert glyphs_data.design_of("GFSArtemisia-BoldItalic") == "GFSArtemisia"  # its family field says GFS Didot
    assert glyphs_data.design_of("GoMono-Bold") == glyphs_data.design_of("Go-Bold") != glyphs_data.design_of("Gorm")


def _installed_subset() -> list[Path]:
    """A few shipped faces present on this machine: one per Greek-capable design (6), a Latin-only one, the control."""
    present = {n: e for n, e in sorted(INFO["fonts"].items()) if Path(e["file"]).is_file()}
    greek = {e["design"]: e for e in reversed(present.values()) if e["greek"] and e["design"] != "Cabin Sketch"}
    latin = [e for e in present.values() if not e["greek"] and e["design"] != "Cabin Sketch"][:1]
    control = [e for e in present.values() if e["design"] == glyphs_data.CONTROL_DESIGN][:1]
    return [Path(e["file"]) for e in [*sorted(greek.values(), key=lambda e: e["file"])[:6], *latin, *control]]


SUBSET = _installed_subset()
NO_FONTS = (
    "the shipped fonts are not installed here (rebuilding needs them: "
    "apt-get install $(python -c 'from trainer.experiments.glyphs_data import PACKAGES; print(PACKAGES)'))"
)


@pytest.mark.skipif(len(SUBSET) < 8, reason=NO_FONTS)
def test_builder_is_deterministic(tmp_path):
    builds = []
    for run in range(2):
        faces = glyphs_data.find_faces(SUBSET)
        splits = glyphs_data.assign_splits(faces, train_fonts=2, val_fonts=1)
        arrays = glyphs_data.render_splits(splits, size=16)
        glyphs_data.write_npz(tmp_path / f"{run}.npz", arrays)
        builds.append((splits, arrays))
    (splits, arrays), (splits_again, arrays_again) = builds
    assert splits == splits_again and sorted(arrays) == sorted(arrays_again)
    for name in arrays:
        assert arrays[name].tobytes() == arrays_again[name].tobytes(), name
    assert (tmp_path / "0.npz").read_bytes() == (tmp_path / "1.npz").read_bytes()
    assert len(splits["target_train"]) == 2 and splits["target_val"] and splits["target_heldout"]
    assert arrays["images_target_train"].shape == (20, 16, 16)
    assert glyphs_data.rasterise(SUBSET[0], "Ab", size=24).shape == (2, 24, 24)  # other sizes: one parameter

    # The same fonts and versions redraw the shipped images exactly.
    shipped, shipped_fonts = glyphs_data.load_glyphs("source", rgb=False)[0], glyphs_data.load_glyph_fonts("source")
    versions = INFO["rendering"]["pillow"], INFO["rendering"]["freetype"]
    if versions == (Image.__version__, features.version("freetype2")):
        for face in splits["source"][:3]:
            redrawn = arrays["images_source"][arrays["fonts_source"] == list(arrays["font_names"]).index(face.name)]
            assert np.array_equal(redrawn, shipped[shipped_fonts == face.name]), face.name


@pytest.mark.skipif(len(SUBSET) < 8, reason=NO_FONTS)
def test_a_letter_the_face_lacks_is_refused():
    latin_only = next(Path(e["file"]) for e in INFO["fonts"].values() if not e["greek"] and Path(e["file"]).is_file())
    face = glyphs_data.read_face(latin_only)
    assert face is not None and not face.greek
    with pytest.raises(ValueError, match="does not draw"):
        glyphs_data.rasterise(latin_only, glyphs_data.GREEK, size=16)
    # A cmap that claims the letter still fails: FreeType draws the missing-glyph box, which is compared against.
    lying_cmap = {ord(c): "A" for c in glyphs_data.LATIN + glyphs_data.GREEK}
    assert glyphs_data._drawn(latin_only, glyphs_data.GREEK, lying_cmap) is None
    assert glyphs_data._drawn(latin_only, "Ab", lying_cmap) is not None
