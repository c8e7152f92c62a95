"""The glyph experiment's shipped models (assets/glyphs, launch/make_glyph_assets.py) load and are what their info
file says, and the source-model recipe they were trained with resumes exactly."""

import json

import numpy as np
import torch

from models.dit import DiTFamily
from models.feature_net import load_feature_net, nhwc_to_nchw
from trainer.experiments import glyphs_data
from trainer.experiments.glyphs_assets import GLYPH_DIT, NUM_LATIN, SIZE, class_accuracy, classifier_splits, source_draw
from trainer.experiments.shipped_models import SourceRecipe, train_source_model

ASSETS = glyphs_data.ASSETS
INFO = json.loads((ASSETS / "models_info.json").read_text())


def test_assets_fit_the_size_budget():
    files = [p for p in (ASSETS / "source_model").rglob("*") if p.is_file()] + [ASSETS / "feature_net.pt"]
    assert sum(p.stat().st_size for p in files) <= 10e6


def test_feature_net_loads_and_scores_what_its_info_says():
    """Accuracy over both scripts' 62 classes, recomputed on the held-out sets: the recorded figures are this net's."""
    net = load_feature_net(ASSETS / "feature_net.pt")
    assert net.config["num_classes"] == NUM_LATIN + len(glyphs_data.GREEK)
    splits = classifier_splits()
    for name in ("source_heldout_faces", "target_heldout", "control"):
        images, classes, _ = splits[name]
        assert class_accuracy(net, images, classes) == INFO["feature_net"]["accuracy"][name], name
    assert INFO["feature_net"]["accuracy"]["target_heldout"] >= 0.9  # it can tell the Greek capitals apart


def test_source_model_loads_as_a_family_and_denoises_its_letters():
    family = DiTFamily.from_pretrained(str(ASSETS / "source_model"), num_classes=0)
    config = {k: family.transformer.config[k] for k in GLYPH_DIT}
    assert config == GLYPH_DIT and family.null_condition == NUM_LATIN
    assert sum(p.numel() for p in family.denoiser.parameters()) == INFO["source_model"]["parameters"]
    images, labels = glyphs_data.load_glyphs("source", SIZE)
    x0 = nhwc_to_nchw(images[:64]).float() / 127.5 - 1
    generator = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=generator), torch.full((64,), 100)
    alpha = torch.from_numpy(np.cumprod(1 - family.betas()))[100].float()
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        eps = family.denoiser(x_t, timestep=t, class_labels=torch.from_numpy(labels[:64])).sample[:, :3]
    assert ((eps - noise) ** 2).mean() < 0.5 * (noise**2).mean()  # a trained denoiser, not noise


def test_recorded_gate_1_is_complete():
    gate = INFO["gate_source_samples"]
    for cfg in ("cfg_1.0", "cfg_1.5"):
        row = gate[cfg]
        assert row["passes"] == (row["accuracy"] >= 0.9 and row["fid"] <= 3 * gate["fid_real_vs_real"])


def test_source_recipe_resumes_exactly(tmp_path, capsys):
    """A rerun picks up the step-2 checkpoint a run left and ends on the weights of a run with none; a checkpoint
    of another recipe is ignored."""
    config = {**GLYPH_DIT, "num_layers": 1, "attention_head_dim": 8}
    recipe = SourceRecipe(config, seed=0, steps=4, batch_size=4, lr=1e-3, warmup=2, log_every=100)
    straight, _ = train_source_model(recipe, source_draw(4))
    checkpoint = tmp_path / "checkpoint.pt"
    first, _ = train_source_model(recipe, source_draw(4), None, checkpoint, checkpoint_every=2)
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    resumed, _ = train_source_model(recipe, source_draw(4), None, checkpoint, checkpoint_every=2)
    assert "source model resumed at step 2" in capsys.readouterr().out
    for a, b, c in zip(straight.state_dict().values(), first.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = SourceRecipe(config, seed=1, steps=4, batch_size=4, lr=1e-3, warmup=2, log_every=100)
    train_source_model(other, source_draw(4), None, checkpoint, checkpoint_every=2)
    assert "resumed" not in capsys.readouterr().out
