"""Target data preparation: an ImageFolder into shards, unreadable images reported, the same on 1 or 2 ranks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from data.images import center_crop_arr, check_image, hflip, list_image_folder, load_image, parse_background, scan_image
from data.shard_jobs import derived_seed
from data.shards import MANIFEST_NAME, ShardDataset, shard_name
from models.dit import DiTFamily
from tests.conftest import assert_ok, run_entry, run_here
from tests.tiny import make_tiny_dit
from trainer.config import ConfigError, load_config
from trainer.jobs.kinds.shared import check_resolution

CLASSES = {"cat": 4, "dog": 3}  # readable images per class
BAD = ["dog/random_bytes.jpg", "dog/random_bytes.png", "dog/truncated.jpg"]  # in listing order


def random_image(rng, height: int, width: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def make_image_folder(root: Path, empty_class: bool = False) -> Path:
    """Readable images of several sizes and modes, three unreadable files, a non-image file."""
    rng = np.random.default_rng(0)
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            mode = ("RGB", "L", "RGBA")[k % 3]
            image = random_image(rng, 9 + 11 * k, 30 - 3 * k, mode)
            image.save(root / name / (f"{k}.png" if mode == "RGBA" or k % 2 else f"{k}.jpg"))
    (root / "cat" / "nested").mkdir()
    random_image(rng, 40, 20).save(root / "cat" / "nested" / "deep.jpg")  # found recursively, as ImageFolder
    (root / "dog" / "random_bytes.png").write_bytes(rng.bytes(500))
    (root / "dog" / "random_bytes.jpg").write_bytes(rng.bytes(500))
    buffer = io.BytesIO()
    random_image(rng, 64, 64).save(buffer, format="JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    (root / "dog" / "labels.txt").write_text("not an image")
    if empty_class:
        (root / "empty_class").mkdir()
    return root


def prepare_args(model: Path, images: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"model.pretrained={model}", f"prepare.images={images}", f"data.target={out}",
        "prepare.resolution=8", "prepare.samples_per_shard=3", "prepare.batch_size=2", *overrides,
    ]  # fmt: skip


def run_prepare(args: list[str], num_procs: int = 1):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # see tests/jobs/test_generate_bank.py
        return run_entry("prepare_data.py", args, num_procs=num_procs)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepare_models")
    return {"pixel": make_tiny_dit(root / "pixel"), "latent": make_tiny_dit(root / "latent", latent=True)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "images")


@pytest.fixture(scope="module")
def prepared(models, images, tmp_path_factory):
    """Pixel-space shards from one process, and what it printed."""
    out = tmp_path_factory.mktemp("prepared") / "target"
    proc = run_prepare(prepare_args(models["pixel"], images, out))
    assert_ok(proc)
    return out, proc


# --- pure helpers -------------------------------------------------------------------------------------
def test_listing_is_sorted_and_ignores_non_images(images):
    listing = list_image_folder(images)
    assert listing.classes == ["cat", "dog"]
    assert [label for _, label in listing.files] == [0] * 5 + [1] * 6
    assert listing.files[:5] == [("cat/0.jpg", 0), ("cat/1.png", 0), ("cat/2.png", 0), ("cat/3.png", 0)] + [
        ("cat/nested/deep.jpg", 0)
    ]
    assert listing.ignored == ["dog/labels.txt"]
    assert [check_image(images / path) is None for path, _ in listing.files if path.startswith("dog")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "images", empty_class=True)
    with pytest.raises(ValueError, match=f"class folder {root / 'empty_class'} holds no images"):
        list_image_folder(root)


def test_center_crop_matches_dit():
    rng = np.random.default_rng(1)
    image = random_image(rng, 300, 140)  # 140 and 70 are >= 2 * 32: two box halvings, then bicubic
    cropped = center_crop_arr(image, 32)
    assert cropped.size == (32, 32)
    halved = image.resize((70, 150), Image.BOX).resize((35, 75), Image.BOX)
    resized = np.asarray(halved.resize((32, round(75 * 32 / 35)), Image.BICUBIC))  # 32 x 69
    np.testing.assert_array_equal(np.asarray(cropped), resized[18:50])


def test_resolution_must_fit_the_model(models):
    with pytest.raises(ConfigError, match=r"prepare.resolution=16 .* set prepare.resolution=8"):
        check_resolution(DiTFamily.from_pretrained(str(models["latent"])), 16)
    with pytest.raises(ConfigError, match=r"prepare.resolution=4 gives images .* set prepare.resolution=8"):
        check_resolution(DiTFamily.from_pretrained(str(models["pixel"])), 4)


def make_transparent_folder(root: Path) -> Path:
    """8 x 8 images whose left half is fully transparent (storing red or black there) and right half opaque, in
    the three ways PNGs carry transparency, and two opaque images (one RGBA) that must not be counted."""
    (root / "a").mkdir(parents=True)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)  # hidden colour under alpha 0: must not show through
    rgb[:, 4:] = (0, 255, 0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "a" / "rgba.png")
    Image.fromarray(np.dstack([np.where(alpha, 200, 0).astype(np.uint8), alpha]), "LA").save(root / "a" / "la.png")
    palette = Image.fromarray((alpha // 255).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 transparent red, index 1 opaque blue
    palette.save(root / "a" / "palette.png", transparency=0)
    Image.fromarray(rgb, "RGB").save(root / "a" / "opaque.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)]), "RGBA").save(root / "a" / "opaque_rgba.png")
    return root


TRANSPARENT = {"la.png": (200, 200, 200), "palette.png": (0, 0, 255), "rgba.png": (0, 255, 0)}  # opaque half


def test_transparent_pixels_take_the_background(tmp_path):
    root = make_transparent_folder(tmp_path / "images")
    for name, opaque in TRANSPARENT.items():
        for background in ((255, 255, 255), (10, 20, 30)):
            pixels = np.rint((load_image(root / "a" / name, 8, background) + 1) * 127.5).transpose(1, 2, 0)
            np.testing.assert_array_equal(pixels[:, :4], np.broadcast_to(background, (8, 4, 3)), err_msg=name)
            np.testing.assert_array_equal(pixels[:, 4:], np.broadcast_to(opaque, (8, 4, 3)), err_msg=name)
        assert scan_image(root / "a" / name) == (None, True)
    assert scan_image(root / "a" / "opaque_rgba.png") == (None, False)
    assert scan_image(root / "a" / "opaque.png") == (None, False)


def test_background_colours_and_bad_values():
    assert parse_background("white") == (255, 255, 255) and parse_background("black") == (0, 0, 0)
    assert parse_background("0, 128,255") == (0, 128, 255) and parse_background("#102030") == (16, 32, 48)
    paths = ["model.pretrained=/m", "data.target=/t"]
    for value, why in (("bluish", "not a colour name"), ("1,2", "not R,G,B"), ("1,2,300", "not R,G,B")):
        with pytest.raises(ConfigError, match=f"prepare.background: '{value}' is {why}"):
            load_config("tiny_cpu", [*paths, f"prepare.background={value}"])


# --- the job, as users run it -------------------------------------------------------------------------
slow = pytest.mark.slow  # real processes


@slow
def test_empty_class_stops_the_job(models, tmp_path):
    root = make_image_folder(tmp_path / "images", empty_class=True)
    proc = run_here("prepare_data.py", prepare_args(models["pixel"], root, tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert f"class folder {root / 'empty_class'} holds no images" in proc.stderr
    assert not (tmp_path / "out").exists()


@slow
def test_unreadable_images_are_reported_and_the_rest_written(prepared, images):
    out, proc = prepared
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 8 and report["images_per_class"] == {"cat": 5, "dog": 3}
    assert [item["path"] for item in report["unreadable"]] == BAD and report["num_unreadable"] == 3
    assert all(item["error"] for item in report["unreadable"]) and report["ignored"] == ["dog/labels.txt"]
    assert "prepare: 8 images of 2 classes written" in proc.stdout and "3 unreadable images skipped" in proc.stdout
    assert all(f"unreadable: {path} (" in proc.stdout for path in BAD)

    dataset = ShardDataset(out)
    assert len(dataset) == 8 and dataset.manifest.meta["classes"] == ["cat", "dog"]
    assert set(dataset.manifest.fields) == {"x", "x_flip", "label", "meta"}
    for i in range(len(dataset)):
        sample = dataset[i]
        path = sample["meta"]["path"]
        assert sample["meta"]["index"] == i and path not in BAD
        assert sample["label"] == ["cat", "dog"].index(path.split("/")[0])
        assert sample["x"].shape == (3, 8, 8) and sample["x"].dtype == np.float32
        np.testing.assert_array_equal(sample["x"], load_image(images / path, 8))
        np.testing.assert_array_equal(sample["x_flip"], hflip(sample["x"]))  # in pixel space, the flip itself


@slow
def test_two_processes_write_the_same_shards_as_one(prepared, models, images, tmp_path):
    out, _ = prepared
    proc = run_prepare(prepare_args(models["pixel"], images, tmp_path / "target"), num_procs=2)
    assert_ok(proc)
    names = [shard_name(j) for j in range(3)] + [MANIFEST_NAME, "report.json", "job.json"]
    assert {n: (tmp_path / "target" / n).read_bytes() for n in names} == {n: (out / n).read_bytes() for n in names}
    assert not (tmp_path / "target" / shard_name(3)).exists()


@slow
def test_latents_and_flipped_latents(models, images, tmp_path):
    out = tmp_path / "target"
    assert_ok(run_prepare(prepare_args(models["latent"], images, out, "prepare.seed=7")))
    dataset = ShardDataset(out)
    vae = AutoencoderKL.from_pretrained(models["latent"] / "vae").eval()

    def vae_latent(image: np.ndarray, index: int, view: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(derived_seed(7, index, view))
        with torch.no_grad():
            posterior = vae.encode(torch.from_numpy(image)[None]).latent_dist
        return (posterior.sample(generator=generator) * vae.config.scaling_factor)[0].numpy()

    for i in (0, 4, 7):
        sample = dataset[i]
        assert sample["x"].shape == (4, 4, 4) and sample["x_flip"].shape == (4, 4, 4)
        image = load_image(images / sample["meta"]["path"], 8)
        np.testing.assert_allclose(sample["x"], vae_latent(image, i, 0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sample["x_flip"], vae_latent(hflip(image), i, 1), rtol=1e-5, atol=1e-5)
        assert not np.allclose(sample["x_flip"], sample["x"][..., ::-1], atol=1e-3)  # not the flipped latent


@slow
def test_transparent_images_are_composited_and_counted(models, tmp_path):
    root = make_transparent_folder(tmp_path / "images")
    out = tmp_path / "target"
    proc = run_prepare(prepare_args(models["pixel"], root, out, "prepare.background=0,0,255"))
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["num_transparent"] == 3 and report["background"] == [0, 0, 255]
    assert report["transparent"] == [f"a/{name}" for name in sorted(TRANSPARENT)]
    assert "3 images with transparent pixels composited onto RGB (0, 0, 255) (prepare.background)" in proc.stdout
    dataset = ShardDataset(out)
    assert len(dataset) == 5
    for i in range(len(dataset)):
        sample = dataset[i]
        name = sample["meta"]["path"].split("/")[1]
        pixels = np.rint((sample["x"] + 1) * 127.5).transpose(1, 2, 0)  # pixel-space model: x is the image
        if name in TRANSPARENT:
            np.testing.assert_array_equal(pixels[:, :4], np.broadcast_to((0, 0, 255), (8, 4, 3)), err_msg=name)
            np.testing.assert_array_equal(pixels[:, 4:], np.broadcast_to(TRANSPARENT[name], (8, 4, 3)), err_msg=name)
        else:  # opaque: the stored colours, red included
            np.testing.assert_array_equal(pixels[:, :4], np.broadcast_to((255, 0, 0), (8, 4, 3)), err_msg=name)


def test_every_family_names_a_data_kind_the_jobs_know():
    """The prepare and bank jobs reach a family's data only through its data kind: every registered family names
    one, every kind has both jobs' halves, and an unknown kind is refused by name."""
    from models import FAMILIES, family_class
    from trainer.jobs.kinds import DATA_KINDS, data_kind

    kinds = {name: family_class(name).data_kind for name in FAMILIES}
    assert kinds == {"dit": "labels", "dit_edm": "labels", "dit_flow": "labels", "sd_controlnet": "controlnet",
                     "sd3": "text", "flux": "text"}  # fmt: skip
    for name in DATA_KINDS:
        kind = data_kind(name)
        assert kind.name == name and callable(kind.prepare) and callable(kind.bank_recipe)
    with pytest.raises(ValueError, match=r"unknown data kind 'captions' \(a family's data_kind\); known: labels, co"):
        data_kind("captions")
