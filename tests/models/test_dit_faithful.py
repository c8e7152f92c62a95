"""Faithful to the released DiT: latents sampled unclipped, one shared timestep/label embedder, DiT's own timestep
frequencies on request; checked against the independent re-implementation of the original network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from models.dit import DiTFamily
from tests.core.test_zero_init import EMBEDDER_KEYS, make_dit_with_one_embedder
from tests.models.test_dit_convert import TINY, OriginalDiT
from trainer.config import BankConfig
from trainer.jobs.kinds.labels import bank_samples
from trainer.jobs.kinds.shared import sample_start


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original-layout `.pt` of a tiny DiT with large enough weights that DDIM's x0 estimate leaves [-1, 1]."""
    torch.manual_seed(0)
    model = OriginalDiT(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.15 if p.ndim > 1 else 0.05))
    path = tmp_path_factory.mktemp("original") / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def reference_ddim(model: OriginalDiT, noise, labels, num_steps: int, guidance: float, clip: bool) -> torch.Tensor:
    """DDIM (eta 0) written out from DiT's linear schedule: leading timesteps, final alpha 1, guided epsilon."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    timesteps = list(range(0, 1000, 1000 // num_steps))[::-1]
    x, channels = noise.clone(), noise.shape[1]
    null = torch.full_like(labels, TINY["num_classes"])
    for t in timesteps:
        t_batch = torch.full((len(x),), t)
        with torch.no_grad():
            cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))[
                :, :channels
            ].chunk(2)
        eps = uncond + guidance * (cond - uncond)
        a, a_prev = alphas[t], alphas[t - 1000 // num_steps] if t >= 1000 // num_steps else torch.tensor(1.0)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def test_original_bank_sample_is_the_unclipped_ddim_of_dit(original):
    """The bank of a `.pt` DiT (original timestep frequencies) is DDIM of the original network without clipping."""
    model, path = original
    family = DiTFamily.from_pretrained(str(path), num_attention_heads=2, original_timestep_frequencies=True)
    assert family.scheduler_config["clip_sample"] is False
    bank = BankConfig(num_samples=3, batch_size=3, num_steps=5, guidance_scale=1.5, seed=7)
    samples = bank_samples(family, family.denoiser, range(3), bank, lambda n: None)
    got = torch.from_numpy(np.stack([sample["x"] for sample in samples]))
    starts = [sample_start(bank.seed, i, family.null_condition, family.sample_shape) for i in range(3)]
    labels, noise = torch.tensor([label for label, _ in starts]), torch.stack([n for _, n in starts])
    want = reference_ddim(model, noise, labels, bank.num_steps, bank.guidance_scale, clip=False)
    clipped = reference_ddim(model, noise, labels, bank.num_steps, bank.guidance_scale, clip=True)
    assert (got - clipped).abs().max() > 0.1  # clipping would change these samples: the test bites
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_clip_sample_is_explicit_and_kept_in_the_export(original, tmp_path):
    _, path = original
    family = DiTFamily.from_pretrained(str(path), num_attention_heads=2)
    family.export(family.transformer.state_dict(), tmp_path / "export")
    assert DDIMScheduler.from_pretrained(tmp_path / "export" / "scheduler").config.clip_sample is False
    forced = DiTFamily.from_pretrained(str(path), num_attention_heads=2, clip_sample=True)
    assert forced.scheduler_config["clip_sample"] is True


def test_one_step_moves_every_exported_embedder_copy_identically(tmp_path):
    """The per-block copies train as one embedder: one optimiser step, then every exported copy is the same."""
    pretrained = make_dit_with_one_embedder(tmp_path / "pretrained")
    family = DiTFamily.from_pretrained(str(pretrained), num_classes=4)
    model = family.denoiser.train()
    assert family.shared_embedder
    assert len(list(model.parameters())) < len(model.state_dict())  # the copies are one set of parameters
    optimizer = torch.optim.AdamW(family.tunable_parameters(model), lr=1e-2)
    x, t = torch.randn(4, *family.sample_shape), torch.tensor([3, 300, 600, 999])
    family.predict(model, x, t, torch.tensor([0, 1, 2, 4])).square().mean().backward()
    optimizer.step()
    family.export(model.state_dict(), tmp_path / "export")
    before = DiTTransformer2DModel.from_pretrained(pretrained / "transformer").state_dict()
    after = DiTTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer").state_dict()
    for key in EMBEDDER_KEYS:
        first = after[f"transformer_blocks.0.{key}"]
        assert not torch.allclose(first[:2], before[f"transformer_blocks.0.{key}"][:2])
        for block in (1, 2):
            assert torch.equal(after[f"transformer_blocks.{block}.{key}"], first), (block, key)


def test_stale_copies_in_a_state_dict_are_ignored(tmp_path):
    """A state dict taken elsewhere (an EMA keyed by state_dict()) may hold stale block copies: block 0 counts."""
    family = DiTFamily.from_pretrained(str(make_dit_with_one_embedder(tmp_path / "pretrained")))
    state = {k: v.clone() for k, v in family.transformer.state_dict().items()}
    key = "norm1.emb.class_embedder.embedding_table.weight"
    state[f"transformer_blocks.0.{key}"] += 1.0
    copy = family.denoiser_from_state_dict(state)
    for block in copy.transformer_blocks:
        table = block.norm1.emb.class_embedder.embedding_table.weight
        torch.testing.assert_close(table, state[f"transformer_blocks.0.{key}"])


def test_untied_copies_stay_untied(tmp_path):
    """A diffusers DiT whose blocks hold different embedders keeps them: tying would change the function."""
    from tests.tiny import make_tiny_dit

    family = DiTFamily.from_pretrained(str(make_tiny_dit(tmp_path / "model")))
    assert not family.shared_embedder
    assert len(list(family.denoiser.parameters())) == len(family.denoiser.state_dict())


def test_original_frequencies_survive_export_and_reload(original, tmp_path):
    """With original frequencies the export records them: this family re-applies them on load (the same function),
    while a plain diffusers load computes diffusers' frequencies (a different function)."""
    model, path = original
    family = DiTFamily.from_pretrained(str(path), num_attention_heads=2, original_timestep_frequencies=True)
    family.export(family.transformer.state_dict(), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "transformer" / "config.json").read_text())
    assert config["original_timestep_frequencies"] is True
    reloaded = DiTFamily.from_pretrained(str(tmp_path / "export"))
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        want = model(x, t, y)
        torch.testing.assert_close(reloaded.denoiser(x, timestep=t, class_labels=y).sample, want, atol=1e-5, rtol=0)
        assert (plain(x, timestep=t, class_labels=y).sample - want).abs().max() > 1e-3
