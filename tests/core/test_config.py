"""Config: presets, overrides in struct mode, and the cross-field checks' messages."""

from __future__ import annotations

import pytest

from data.sampler import num_bank_slots
from trainer.config import CONFIG_DIR, ConfigError, gradient_accumulation_steps, load_config

PATHS = ["model.pretrained=/m", "data.target=/t", "data.bank=/b"]
REQUIRED = ("model.pretrained", "data.target")


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    assert load_config(preset, PATHS, REQUIRED).model.pretrained == "/m"


def test_paper_and_released_presets():
    paper = load_config("dit_xl2_paper", PATHS, REQUIRED)
    assert (paper.train.global_batch_size, paper.optim.lr, paper.train.steps) == (32, 1e-4, 24000)
    assert (paper.method.bank_ratio, paper.method.bank_loss_weight, paper.method.tau) == (0.5, 1.0, 1.0)
    assert paper.method.timestep_weights == "complement"
    released = load_config("dit_xl2_released", PATHS, REQUIRED)
    assert (released.method.bank_ratio, released.method.bank_loss_weight) == (0.2, 0.1)
    assert released.method.timestep_weights == "mirrored"
    assert num_bank_slots(32, released.method.bank_ratio, released.method.bank_count) == 6


def test_overrides_are_typed():
    cfg = load_config("tiny_cpu", [*PATHS, "train.steps=11", "optim.lr=0.5", "method.tau=2"], REQUIRED)
    assert (cfg.train.steps, cfg.optim.lr, cfg.method.tau) == (11, 0.5, 2.0)
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("tiny_cpu", [*PATHS, "train.steps=many"], REQUIRED)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.bogus=1", "config key 'model.bogus'"),
        ("train.zero_stage=4", "ZeRO stages are 0, 1, 2, 3"),
        ("train.precision=fp8", "train.precision='fp8' is not one of"),
        ("method.bank_ratio=1.0", r"method.bank_ratio=1.0 must be in \[0, 1\)"),
        ("model.class_init=copy", "model.class_init='copy' is not one of"),
        ("model.control=depth", "config key 'model.control' is now 'model.sd_controlnet.control'"),
        ("model.vae=/v", "config key 'model.vae' is now 'model.dit.vae'"),
        (
            "model.sd_controlnet.control=depth",
            "model.sd_controlnet.control is set, but model.family=dit reads model.dit",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [*PATHS, override], REQUIRED)


def test_each_family_reads_its_own_section():
    sd = load_config("tiny_sd_cpu", [*PATHS, "model.sd_controlnet.control=depth"], REQUIRED)
    assert sd.model.sd_controlnet.control == "depth" and sd.model.dit.vae is None
    with pytest.raises(ConfigError, match="model.dit.clip_sample is set, but model.family=sd_controlnet reads"):
        load_config("tiny_sd_cpu", [*PATHS, "model.dit.clip_sample=true"], REQUIRED)
    edm = load_config("tiny_cpu", [*PATHS, "model.family=dit_edm", "model.dit.clip_sample=false"], REQUIRED)
    assert edm.model.dit.clip_sample is False  # dit_edm reads the DiT section too


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets are: .*dit_xl2_paper"):
        load_config("no_such_preset", PATHS, REQUIRED)


def test_accumulation_from_world_size():
    cfg = load_config("tiny_cpu", [*PATHS, "train.global_batch_size=32", "train.micro_batch_size=4"], REQUIRED)
    assert [gradient_accumulation_steps(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="not divisible by ranks x train.micro_batch_size = 3 x 4"):
        gradient_accumulation_steps(cfg, 3)
