"""The embedded demo's assets: procedural domains, the shipped source DiT and the FID feature net."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from data import procedural
from models.dit import DiTFamily
from models.feature_net import frechet_distance, load_feature_net, nhwc_to_nchw
from tests.conftest import assert_ok, run_entry
from trainer.evaluation.folder import denoising_error

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo"


def images(domain: str, num: int, seed: int) -> torch.Tensor:
    return nhwc_to_nchw(procedural.make_images(domain, num, seed=seed, size=16)[0])


@pytest.fixture(scope="module")
def feature_net():
    return load_feature_net(ASSETS / "feature_net.pt")


def test_domains_are_deterministic_and_differ():
    a, labels_a = procedural.make_images("source", 256, seed=3, size=16)
    b, labels_b = procedural.make_images("source", 256, seed=3, size=16)
    assert a.shape == (256, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(a, procedural.make_images("source", 256, seed=4, size=16)[0])
    assert set(labels_a.tolist()) == set(range(procedural.NUM_CLASSES))
    target, _ = procedural.make_images("target", 256, seed=3, size=16)
    # Same seed, different domain: different draws and different statistics. The source is broad (dark and light
    # backgrounds, any hue); the target is narrow: light backgrounds, cool-tinted shapes.
    assert 0.4 < procedural.has_dark_background(a).mean() < 0.6
    assert not procedural.has_dark_background(target).any()
    assert target[..., 2].mean() > target[..., 0].mean() + 10
    assert target.std() < a.std()
    assert procedural.make_images("target", 8, seed=0, size=32)[0].shape == (8, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown procedural domain"):
        procedural.make_images("imagenet", 4, seed=0)


def test_shapes_are_what_the_labels_say():
    """One centred, fixed-size shape per class: disc and square cover the centre, a ring leaves a hole."""
    values = procedural.sample_attributes("source", 4, seed=0)
    values.update(labels=np.arange(4), centre=np.full((4, 2), 0.5), radius=np.full(4, 0.35))
    values.update(fg=np.full((4, 3), 0.9), bg_a=np.full((4, 3), 0.1), bg_b=np.full((4, 3), 0.1))
    background = values["bg_a"][:, None, None, :] * 255
    disc, square, ring, cross = np.abs(procedural.render(values, 16) - background).sum(-1) > 60
    assert disc[8, 8] and square[8, 8] and cross[8, 8] and not ring[8, 8]
    assert disc.sum() > square.sum() > cross.sum()
    assert square[3, 3] and not disc[3, 3]  # corners belong to the square only


def test_write_image_folder_writes_one_folder_per_class(tmp_path):
    folder = procedural.write_image_folder("target", tmp_path / "target", num_per_class=3, seed=0, size=16)
    names = sorted(p.name for p in folder.iterdir())
    assert names == procedural.class_folder_names()  # sorted order is the label order
    for name in names:
        files = sorted((folder / name).glob("*.png"))
        assert len(files) == 3
        image = np.asarray(Image.open(files[0]))
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    again = procedural.write_image_folder("target", tmp_path / "again", num_per_class=3, seed=0, size=16)
    first = next((again / names[0]).glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(folder / names[0] / first.name)))


def test_assets_fit_the_size_budget():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert (ASSETS / "source_model" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (ASSETS / "source_model" / "scheduler" / "scheduler_config.json").is_file()
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20


def test_feature_net_separates_the_domains(feature_net):
    assert feature_net.num_features == 32
    same = frechet_distance(feature_net, images("target", 300, 1), images("target", 300, 2))
    across = frechet_distance(feature_net, images("target", 300, 1), images("source", 300, 2))
    assert same < 0.1 * across


def test_feature_net_works_inside_torchmetrics_with_uint8_and_float(feature_net):
    real, fake = images("source", 64, 1), images("source", 64, 2)
    metric = FrechetInceptionDistance(feature=feature_net)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    as_float = frechet_distance(feature_net, real.float() / 255, fake.float() / 255)
    assert float(metric.compute()) == pytest.approx(as_float, rel=1e-4)
    metric.train()  # the metric may flip its children to train mode; features must not change
    assert torch.equal(feature_net(real[:4]), feature_net.eval()(real[:4]))


def test_source_model_samples_look_like_the_source_domain(feature_net):
    transformer = DiTTransformer2DModel.from_pretrained(ASSETS / "source_model" / "transformer").eval()
    scheduler = DDPMScheduler.from_pretrained(ASSETS / "source_model" / "scheduler")
    assert transformer.config.num_embeds_ada_norm == procedural.NUM_CLASSES
    assert (transformer.config.in_channels, transformer.config.out_channels) == (3, 6)
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.num_train_timesteps == 1000
    family = DiTFamily(transformer, None, dict(scheduler.config))
    labels = torch.arange(96) % procedural.NUM_CLASSES
    x = family.sample(transformer, labels, num_steps=10, generator=torch.Generator().manual_seed(0))
    samples = ((x + 1) * 127.5).round().byte()
    noise = torch.randint(0, 256, samples.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = images("source", 300, 5)
    to_samples = frechet_distance(feature_net, source, samples)
    assert to_samples < 0.5 * frechet_distance(feature_net, source, noise)
    assert to_samples < frechet_distance(feature_net, images("target", 300, 5), samples)


def test_denoising_error_by_noise_level():
    """The shipped model denoises its own domain better than the shifted one where the domains differ most (high
    noise, coarse content), and worse than chance nowhere; the result is a pure function of the seed."""
    folder = str(ASSETS / "source_model")
    bands = [(0, 100), (600, 1000)]
    source = images("source", 200, 7).float() / 127.5 - 1
    target = images("target", 200, 7).float() / 127.5 - 1
    on_source = denoising_error(folder, source, None, bands, seed=0)
    on_target = denoising_error(folder, target, None, bands, seed=0)
    assert on_source == denoising_error(folder, source, None, bands, seed=0)
    assert on_source != denoising_error(folder, source, None, bands, seed=1)
    assert max(on_source) < 0.5 and max(on_target) < 1.0  # predicting zero would score 1 (unit-variance noise)
    assert on_source[1] < on_target[1]


def test_demo_runs_end_to_end(tmp_path):
    """`launch/demo.py` with a few steps: every job runs, and the table, grids and TensorBoard logs are written."""
    out = tmp_path / "demo"
    args = ["--out", str(out), "--images_per_class", "4", "--eval_images", "16", "--bank_samples", "32"]
    args += ["--overrides", "train.steps=4"]
    result = run_entry("demo.py", args)
    assert_ok(result)
    results = json.loads((out / "results.json").read_text())
    models = ["pre-trained", "finetune", "difftune"]
    assert list(results["fid_target"]) == models and all(v >= 0 for v in results["fid_target"].values())
    assert results["dark_background_share"]["target (real)"] == 0.0
    assert all(len(results["denoising_error"][m]["source"]) == 4 for m in models)
    assert "FID (target)" in result.stdout and "ε-MSE on unseen target images" in result.stdout
    assert all((out / f"grid_{m}.png").is_file() for m in models)
    for method in ("finetune", "difftune"):
        assert list((out / method).rglob("events.out.tfevents*")), f"no TensorBoard log in {method}"
    # The two trainings differ only by the method: Diff-Tuning read the bank, fine-tuning did not.
    assert OmegaConf.load(out / "difftune" / "config.yaml").method.bank_ratio == 0.5
    assert OmegaConf.load(out / "finetune" / "config.yaml").method.bank_ratio == 0.0
