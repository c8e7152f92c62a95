"""What the data jobs ask of every family: its model space (encode, decode, downsampling), the fingerprint of its
frozen parts, its sampler; and the shard-job skeleton's crash point, with real processes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, EDMEulerScheduler

from data.shard_jobs import JOB_NAME, is_complete
from data.shards import MANIFEST_NAME, shard_name
from launch.prepare_data import main as prepare_main
from models.dit import DIT_SCHEDULE, DiTFamily
from models.dit_edm import DiTEDMFamily
from models.family import state_sha256
from models.sd_controlnet import SDControlNetFamily
from tests.conftest import assert_ok, run_entry
from tests.jobs.test_prepare_data import make_image_folder, prepare_args
from tests.tiny import TINY_DIT, make_tiny_dit
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, make_tiny_sd
from trainer.jobs.kinds.shared import REPORT_NAME, check_resolution


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {
        "pixel": make_tiny_dit(root / "pixel"),
        "latent": make_tiny_dit(root / "latent", latent=True),
        "sd": make_tiny_sd(root / "sd"),
    }


@pytest.fixture(scope="module")
def families(folders) -> dict:
    return {
        "pixel": DiTFamily.from_pretrained(str(folders["pixel"])),
        "latent": DiTFamily.from_pretrained(str(folders["latent"])),
        "edm": DiTEDMFamily.from_pretrained(str(folders["latent"])),
        "sd": SDControlNetFamily.from_pretrained(str(folders["sd"])),
    }


# (family, pixels per model-space pixel, pixel side of its samples): from the tiny models' own definitions
SPACES = [("pixel", 1, 8), ("latent", 2, 8), ("edm", 2, 8), ("sd", IMAGE_SIZE // LATENT_SIZE, IMAGE_SIZE)]


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("name, factor, side", SPACES)
def test_pixels_go_to_the_sample_shape_and_back(families, name, factor, side):
    family = families[name]
    assert family.latent_downsampling == factor
    pixels = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = family.encode(pixels, generators(5, 6))
    assert x.shape == (2, *family.sample_shape)
    decoded = family.decode(x)
    assert decoded.shape == pixels.shape and decoded.min() >= -1 and decoded.max() <= 1
    if factor == 1:
        assert torch.equal(x, pixels) and torch.equal(decoded, pixels)  # pixel space: the pixels themselves
    else:
        # one posterior sample per image from its own generator: the batch around it changes nothing
        torch.testing.assert_close(family.encode(pixels[1:], generators(6))[0], x[1], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            by_hand = family.vae.encode(pixels[:1]).latent_dist.sample(generator=generators(5)[0])
        torch.testing.assert_close(x[:1], by_hand * family.vae.config.scaling_factor)


def test_a_latent_dit_without_a_vae_cannot_encode_images():
    config = dict(TINY_DIT, in_channels=4, out_channels=8, sample_size=4)
    family = DiTFamily(DiTTransformer2DModel(**config), None, DIT_SCHEDULE, latent_space=True)
    assert family.latent_downsampling == 1
    with pytest.raises(ValueError, match="set model.vae to a local AutoencoderKL folder"):
        check_resolution(family, 4)  # prepare stops before any work


def test_the_frozen_fingerprint_covers_exactly_the_parts_that_do_not_train(folders):
    assert DiTFamily.from_pretrained(str(folders["pixel"])).frozen_fingerprint() is None
    dit = DiTFamily.from_pretrained(str(folders["latent"]))
    assert dit.frozen_fingerprint() == state_sha256(dit.vae)
    sd = SDControlNetFamily.from_pretrained(str(folders["sd"]))
    for family, frozen in ((dit, [dit.vae]), (sd, [sd.unet, sd.vae, sd.text_encoder])):
        before = family.frozen_fingerprint()
        with torch.no_grad():
            next(family.denoiser.parameters()).add_(1.0)
        assert family.frozen_fingerprint() == before
        for part in frozen:
            with torch.no_grad():
                next(part.parameters()).add_(1.0)
            assert family.frozen_fingerprint() != before, type(part).__name__
            before = family.frozen_fingerprint()


def test_each_family_names_its_sampler(families):
    pixel, latent, edm, sd = (families[name].sampling_scheduler() for name in ("pixel", "latent", "edm", "sd"))
    assert isinstance(pixel, DDIMScheduler) and isinstance(latent, DDIMScheduler) and isinstance(sd, DDIMScheduler)
    assert pixel.config.clip_sample is True and latent.config.clip_sample is False  # DiT samples latents unclipped
    assert isinstance(edm, EDMEulerScheduler) and edm.config.get("clip_sample") is None
    assert edm.config.sigma_data == families["edm"].noise_process.sigma_data


PER_SHARD = "prepare.samples_per_shard=2"  # 4 or more shards: rank 1 of 2 owns shards 1 and 3


@pytest.mark.slow
def test_a_rank_crashing_mid_job_loses_only_its_unwritten_shards(folders, tmp_path):
    """debug.crash_after_shards: rank 1 exits after its first shard; the rerun keeps every complete shard and ends
    with the shards and manifest of one uninterrupted process."""
    images = make_image_folder(tmp_path / "images")
    reference, out = tmp_path / "reference", tmp_path / "target"
    assert prepare_main(prepare_args(folders["pixel"], images, reference, PER_SHARD)) == 0  # in process: pixels
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        crash = (PER_SHARD, "debug.crash_after_shards=1", "debug.crash_rank=1")
        crashed = run_entry("prepare_data.py", prepare_args(folders["pixel"], images, out, *crash), num_procs=2)
        assert crashed.returncode != 0
        assert "debug.crash_after_shards=1: rank 1 exits" in crashed.stdout + crashed.stderr
        assert not (out / MANIFEST_NAME).exists()
        names = [shard_name(j) for j in range(json.loads((reference / REPORT_NAME).read_text())["num_shards"])]
        assert len(names) >= 4
        assert is_complete(out, 0) and is_complete(out, 1) and not is_complete(out, 3)
        kept = (out / shard_name(1)).stat()
        assert_ok(run_entry("prepare_data.py", prepare_args(folders["pixel"], images, out, PER_SHARD), num_procs=2))
    assert ((out / shard_name(1)).stat().st_ino, (out / shard_name(1)).stat().st_mtime_ns) == (
        kept.st_ino, kept.st_mtime_ns,
    )  # fmt: skip
    for name in [*names, MANIFEST_NAME, JOB_NAME]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
