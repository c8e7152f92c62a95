"""The Flux family on a tiny guidance-distilled Flux saved by its pipeline: what it refuses by name, the packed
transformer call checked against FluxPipeline's own sampling, the guidance input, the resolution shift, and exports
that diffusers loads (the pipeline, and a LoRA adapter through `load_lora_weights`)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from data.batch import MicroBatch
from models.flux import FluxFamily
from models.tuning import save_adapter, tuning_method
from tests.tiny_sd3 import MAX_SEQUENCE_LENGTH, tiny_flux  # noqa: F401
from trainer.config import ConfigError, load_config
from trainer.loop import slot_losses

SETTINGS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
PIPE_ARGS = dict(height=64, width=64, max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def family(tiny_flux):  # noqa: F811
    return FluxFamily.from_pretrained(str(tiny_flux["pretrained"]), **SETTINGS)


def test_missing_parts_and_other_families_settings_are_refused_by_name(tiny_flux, tmp_path):  # noqa: F811
    folder = tmp_path / "partial"
    shutil.copytree(tiny_flux["pretrained"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/: is it a folder saved by FluxPipeline"):
        FluxFamily.from_pretrained(str(folder), **SETTINGS)
    with pytest.raises(ValueError, match=r"model.num_classes=2: flux is conditioned on prompts"):
        FluxFamily.from_pretrained(str(tiny_flux["pretrained"]), num_classes=2)
    with pytest.raises(ConfigError, match=r"model.flux.guidance is set, but model.family=sd3 reads model.sd3"):
        load_config("tiny_sd3_cpu", ["model.flux.guidance=2.0"])
    with pytest.raises(ConfigError, match=r"model.sd3.t5 is set, but model.family=flux reads model.flux"):
        load_config("tiny_flux_cpu", ["model.sd3.t5=false"])


def test_resolution_sets_the_latents_and_flux_shift(tiny_flux):  # noqa: F811
    """64 px: 8x8 latents, 16 packed tokens, shift exp(mu(16)); 128 px: 16x16 latents and exp(mu(64))."""
    for resolution, side in ((None, 8), (128, 16)):
        family = FluxFamily.from_pretrained(str(tiny_flux["pretrained"]), resolution=resolution, **SETTINGS)
        assert family.sample_shape == (4, side, side)
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)
        assert family.noise_process.time.shift == pytest.approx(np.exp(mu))
        assert family.sampling_scheduler().config.shift == pytest.approx(np.exp(mu))  # every sampler's shift
    with pytest.raises(ValueError, match=r"model.flux.resolution=72: .* must be a multiple of 16 \(e.g. 64\)"):
        FluxFamily.from_pretrained(str(tiny_flux["pretrained"]), resolution=72, **SETTINGS)


def test_sampling_is_flux_pipelines_with_its_guidance_input(family, tiny_flux):  # noqa: F811
    """From the same latents, the family's Euler chain (embedded guidance 3.5, Flux's time grid) ends where
    FluxPipeline's does: the packing, the ids, the timestep scale and the shift all match."""
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ours = family.sample(None, family.encode_prompts(["a red circle"]), num_steps=3, guidance_scale=3.5, noise=noise,
                         decode=False)  # fmt: skip
    pipe = FluxPipeline.from_pretrained(tiny_flux["pretrained"])
    packed = FluxPipeline._pack_latents(noise, 1, 4, 8, 8)
    theirs = pipe("a red circle", latents=packed, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                  **PIPE_ARGS).images  # fmt: skip
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(theirs, 64, 64, 8), rtol=1e-4, atol=1e-5)
    x, t = torch.randn((2, 4, 8, 8)), torch.tensor(700.0)
    condition = family.encode_prompts(["a square", "the image"])
    guided, plain = family.guided_epsilon(None, x, t, condition, 3.5), family.guided_epsilon(None, x, t, condition, 1.0)
    assert (guided - plain).abs().max() > 1e-6  # the guidance input is used
    assert family.guidance == 3.5  # and the training value is left as it was (FLUX.1's default)


def test_slot_losses_are_the_velocity_error(family):
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn((2, 4, 8, 8), generator=generator), torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([0.2, 0.8], dtype=torch.float64)
    cached = family.encode_prompts(["a red circle", "a square"])
    batch = MicroBatch(
        x0=x0, noise=noise, t=t, null_condition=torch.tensor([False, True]), is_retention=torch.zeros(2, dtype=bool),
        condition={"prompt_embeds": cached.prompt_embeds, "pooled_embeds": cached.pooled_embeds}, ids=np.zeros((2, 3)),
    )  # fmt: skip
    losses = slot_losses(family, family.denoiser, batch, family.noise_process, torch.float32)
    tt = t.float().view(-1, 1, 1, 1)
    condition = family.condition(batch.condition, batch.null_condition)
    with torch.no_grad():
        velocity = family.predict(family.denoiser, (1 - tt) * x0 + tt * noise, 1000 * t.float(), condition)
    assert velocity.shape == x0.shape
    torch.testing.assert_close(losses.detach(), ((velocity - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))


def test_export_and_lora_adapter_load_in_flux_pipeline(tiny_flux, tmp_path):  # noqa: F811
    family = FluxFamily.from_pretrained(str(tiny_flux["pretrained"]), **SETTINGS)
    tuning = tuning_method("lora", SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_targets=["to_q", "to_k", "to_v"]))
    tuning.apply(family.denoiser)
    generator = torch.Generator().manual_seed(2)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if "lora_" in k else v
        for k, v in family.denoiser.state_dict().items()
    }
    family.export(tuning.merged_state_dict(state), tmp_path / "merged")
    family.export_adapter(save_adapter(tuning, state, tmp_path / "adapter"), tmp_path / "adapter")
    again = FluxFamily.from_pretrained(str(tmp_path / "merged"), **SETTINGS)
    assert again.noise_process.settings() == family.noise_process.settings()
    base, merged = (
        FluxPipeline.from_pretrained(tiny_flux["pretrained"]),
        FluxPipeline.from_pretrained(tmp_path / "merged"),
    )
    run = lambda pipe: pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2,  # noqa: E731
                            output_type="np", **PIPE_ARGS).images  # fmt: skip
    before, expected = run(base), run(merged)
    base.load_lora_weights(tmp_path / "adapter")
    np.testing.assert_allclose(run(base), expected, atol=1e-4)
    assert np.abs(before - expected).max() > 1e-3
