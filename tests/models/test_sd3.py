"""The Stable Diffusion 3 family on a tiny SD3 saved by its pipeline: loading and the parts it refuses by name, the
cached-prompt conditions, the flow loss against a hand computation, and exports that diffusers loads (the whole
pipeline, and a LoRA adapter through `load_lora_weights`)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from data.batch import MicroBatch
from models.sd3 import SD3Family, TextCondition
from models.tuning import save_adapter, tuning_method
from tests.tiny_sd3 import MAX_SEQUENCE_LENGTH, tiny_sd3  # noqa: F401
from trainer.config import ConfigError, load_config
from trainer.evaluation.evaluate import check_eval_config
from trainer.loop import slot_losses

SETTINGS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
PIPE_ARGS = dict(num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def family(tiny_sd3):  # noqa: F811
    return SD3Family.from_pretrained(str(tiny_sd3["pretrained"]), **SETTINGS)


def without(tiny_sd3, tmp_path, *parts):  # noqa: F811
    folder = tmp_path / "partial"
    shutil.copytree(tiny_sd3["pretrained"], folder)
    for part in parts:
        shutil.rmtree(folder / part)
    return str(folder)


def test_missing_parts_and_class_labels_are_refused_by_name(tiny_sd3, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/: is it a folder saved by StableDiffusion3"):
        SD3Family.from_pretrained(without(tiny_sd3, tmp_path, "text_encoder_2"), **SETTINGS)
    no_t5 = without(tiny_sd3, tmp_path / "b", "text_encoder_3", "tokenizer_3")
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_3/, tokenizer_3/; without T5, set model.sd3.t5"):
        SD3Family.from_pretrained(no_t5, **SETTINGS)
    with pytest.raises(FileNotFoundError, match=r"model.pretrained=/nowhere does not exist: .*Stable Diffusion 3"):
        SD3Family.from_pretrained("/nowhere")
    with pytest.raises(ValueError, match=r"model.num_classes=3: sd3 is conditioned on prompts"):
        SD3Family.from_pretrained(str(tiny_sd3["pretrained"]), num_classes=3)
    # Without T5 the family runs as SD3's pipeline does: zeros in place of T5's tokens.
    condition = SD3Family.from_pretrained(no_t5, t5=False, **SETTINGS).encode_prompts(["a red circle"])
    assert condition.prompt_embeds.shape == (1, 77 + MAX_SEQUENCE_LENGTH, 32)
    assert torch.all(condition.prompt_embeds[:, 77:] == 0) and condition.prompt_embeds[:, :77].abs().sum() > 0


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("tiny_sd3_cpu", ["model.dit.clip_sample=true"], "model.dit.clip_sample is set, but model.family=sd3 reads"),
        ("tiny_cpu", ["model.sd3.t5=false"], "model.sd3.t5 is set, but model.family=dit reads model.dit"),
        ("tiny_sd3_cpu", ["method.timestep_weights=logsnr"], "method.timestep_weights=logsnr: the mirrored and logsnr"),
    ],
)
def test_settings_of_other_families_are_refused_by_name(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, overrides)


def test_condition_takes_cached_embeddings_and_the_null_prompt_where_null(family):
    cached = family.encode_prompts(["a red circle", "a blue square on black", "the photo of a circle"])
    fields = {"prompt_embeds": cached.prompt_embeds.half(), "pooled_embeds": cached.pooled_embeds.half()}
    condition = family.condition(fields, torch.tensor([False, True, False]))
    null = family.encode_prompts([""])  # model.sd3.null_prompt's default: SD3's unconditional prompt, rounded as stored
    for row, expected in ((0, cached.prompt_embeds[0]), (1, null.prompt_embeds[0])):
        torch.testing.assert_close(condition.prompt_embeds[row], expected.half().float())
    torch.testing.assert_close(condition.pooled_embeds[1], null.pooled_embeds[0].half().float())
    torch.testing.assert_close(condition.pooled_embeds[2], cached.pooled_embeds[2].half().float())


def test_slot_losses_are_the_velocity_error_by_hand(family):
    """x_t = (1 - t) x0 + t n; the transformer sees 1000 t; the loss is mean |v - (n - x0)|^2 per slot."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, 4, 8, 8), generator=generator), torch.randn((3, 4, 8, 8), generator=generator)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    cached = family.encode_prompts(["a red circle", "a square", "the image"])
    null_mask = torch.tensor([False, True, False])
    batch = MicroBatch(
        x0=x0, noise=noise, t=t, null_condition=null_mask, is_retention=torch.zeros(3, dtype=torch.bool),
        condition={"prompt_embeds": cached.prompt_embeds, "pooled_embeds": cached.pooled_embeds}, ids=np.zeros((3, 3)),
    )  # fmt: skip
    losses = slot_losses(family, family.denoiser, batch, family.noise_process, torch.float32)
    tt = t.float().view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    embeds = torch.where(null_mask[:, None, None], family.null_condition.prompt_embeds, cached.prompt_embeds)
    pooled = torch.where(null_mask[:, None], family.null_condition.pooled_embeds, cached.pooled_embeds)
    with torch.no_grad():
        velocity = family.denoiser(
            hidden_states=x_t, timestep=1000 * t.float(), encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
    torch.testing.assert_close(losses.detach(), ((velocity - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))


def perturbed(state: dict[str, torch.Tensor], seed: int, only: str = "") -> dict[str, torch.Tensor]:
    """`state` with noise added to the tensors whose names contain `only` (all by default)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) if only in k else v for k, v in state.items()}


def test_export_loads_in_the_sd3_pipeline_and_back(family, tmp_path):
    weights = perturbed(family.denoiser.state_dict(), 1)
    family.export(weights, tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export")
    assert pipe.scheduler.config.shift == 3.0
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, weights[key]), key
    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), **PIPE_ARGS).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    again = SD3Family.from_pretrained(str(tmp_path / "export"), **SETTINGS)
    assert again.noise_process.settings() == family.noise_process.settings()
    assert all(torch.equal(again.denoiser.state_dict()[k], v) for k, v in weights.items())
    # The family samples what the pipeline samples from the same noise (Euler, SD3's shift, no guidance).
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = again.sample(None, again.encode_prompts(["a red circle"]), num_steps=2, noise=noise, decode=False)
    theirs = pipe("a red circle", latents=noise, guidance_scale=1.0, **{**PIPE_ARGS, "output_type": "latent"}).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lora_adapter_loads_with_load_lora_weights_as_the_merged_export(tiny_sd3, tmp_path):  # noqa: F811
    """A LoRA whose alpha is not its rank: the adapter file carries the scale, so the pre-trained pipeline with
    `load_lora_weights` samples what the merged export samples."""
    family = SD3Family.from_pretrained(str(tiny_sd3["pretrained"]), **SETTINGS)
    settings = SimpleNamespace(lora_rank=4, lora_alpha=2.0, lora_targets=["to_q", "to_k", "to_v", "add_q_proj"])
    tuning = tuning_method("lora", settings)
    tuning.apply(family.denoiser)
    state = perturbed(family.denoiser.state_dict(), 2, only="lora_")  # B starts at 0: give the adapters values
    family.export(tuning.merged_state_dict(state), tmp_path / "merged")
    adapter = save_adapter(tuning, state, tmp_path / "adapter")
    family.export_adapter(adapter, tmp_path / "adapter")
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["pretrained"])
    merged = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged")
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = base("a red circle", generator=seeded(), **PIPE_ARGS).images
    base.load_lora_weights(tmp_path / "adapter")
    with_lora = base("a red circle", generator=seeded(), **PIPE_ARGS).images
    expected = merged("a red circle", generator=seeded(), **PIPE_ARGS).images
    np.testing.assert_allclose(with_lora, expected, atol=1e-4)
    assert np.abs(before - expected).max() > 1e-3  # the adapter changes what is sampled


def test_guided_velocity_is_cfg_against_the_empty_prompt(family):
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    condition = family.encode_prompts(["a red circle", "a square"])
    t = torch.tensor(600.0)
    guided = family.guided_epsilon(None, x, t, condition, 4.0)
    cond = family.guided_epsilon(None, x, t, condition, 1.0)
    empty = family.encode_prompts(["", ""])  # rounded as stored, as the family keeps it
    rounded = TextCondition(empty.prompt_embeds.half().float(), empty.pooled_embeds.half().float())
    uncond = family.guided_epsilon(None, x, t, rounded, 1.0)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_data_of_other_text_settings_is_refused_by_name(family):
    """A data set prepared with other text settings: its recorded settings, or its embeddings' shapes."""
    sample = {"prompt_embeds": np.zeros((77 + MAX_SEQUENCE_LENGTH, 32)), "pooled_embeds": np.zeros(32)}
    family.check_data(sample, {"max_sequence_length": MAX_SEQUENCE_LENGTH, "t5": True}, "data.target")
    with pytest.raises(ValueError, match=r"data.bank was prepared with max_sequence_length=16, but model.sd3.max"):
        family.check_data(sample, {"max_sequence_length": 16}, "data.bank")
    with pytest.raises(ValueError, match=r"data.target was prepared with t5=False, but model.sd3.t5=True"):
        family.check_data(sample, {"t5": False}, "data.target")
    short = {**sample, "prompt_embeds": np.zeros((80, 32))}
    with pytest.raises(ValueError, match=r"data.target: the samples' prompt_embeds have shape \(80, 32\) but"):
        family.check_data(short, {}, "data.target")
    with pytest.raises(ConfigError, match="the evaluation job does not take text-to-image families yet"):
        check_eval_config(load_config("tiny_sd3_cpu", ["model.pretrained=x"]))
