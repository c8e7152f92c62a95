"""Config: presets, overrides in struct mode, and the cross-field checks' messages."""

from __future__ import annotations

import pytest

from data.sampler import num_bank_slots
from trainer.config import (
    CONFIG_DIR,
    ConfigError,
    describe_batch,
    gradient_accumulation_steps,
    load_config,
    micro_batch_size,
    with_micro_batch,
)

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
    with pytest.raises(ConfigError, match="train.global_batch_size=32 cannot be split over 3 ranks"):
        gradient_accumulation_steps(cfg, 3)
    odd = load_config("tiny_cpu", [*PATHS, "train.global_batch_size=32", "train.micro_batch_size=3"], REQUIRED)
    expected = "ranks x train.micro_batch_size = 2 x 3 = 6; set train.micro_batch_size=auto"
    with pytest.raises(ConfigError, match=expected):
        gradient_accumulation_steps(odd, 2)


@pytest.mark.parametrize("preset", ["dit_xl2_paper", "dit_xl2_released", "finetune"])
def test_dit_presets_start_on_any_gpu_count(preset):
    """micro_batch_size=auto: the largest micro-batch that divides the rank's share, at most the cap."""
    cfg = load_config(preset, PATHS, REQUIRED)
    assert cfg.train.micro_batch_size == "auto"
    layouts = [(micro_batch_size(cfg, w), gradient_accumulation_steps(cfg, w)) for w in (1, 2, 8, 16)]
    assert layouts == [(32, 1), (16, 1), (4, 1), (2, 1)]
    assert describe_batch(cfg, 8) == (
        "global batch 32 = 8 ranks x micro-batch 4 (train.micro_batch_size=auto) x 1 accumulation steps"
    )
    assert with_micro_batch(cfg, 8).train.micro_batch_size == 4 and cfg.train.micro_batch_size == "auto"
    capped = load_config(preset, [*PATHS, "train.max_micro_batch_size=12"], REQUIRED)
    assert [(micro_batch_size(capped, w), gradient_accumulation_steps(capped, w)) for w in (1, 2)] == [(8, 4), (8, 2)]


def test_a_global_batch_that_cannot_be_split_says_what_to_set():
    sd = load_config("sd15_controlnet_canny", PATHS, REQUIRED)
    assert [gradient_accumulation_steps(sd, w) * micro_batch_size(sd, w) * w for w in (1, 2, 4)] == [4, 4, 4]
    for world_size, multiple in ((8, 8), (16, 16)):  # launch/slurm/train.sbatch asks for 2 nodes x 8 GPUs
        with pytest.raises(ConfigError) as err:
            gradient_accumulation_steps(sd, world_size)
        assert str(err.value) == (
            f"train.global_batch_size=4 cannot be split over {world_size} ranks: run on a number of GPUs that divides "
            f"it (1, 2, 4), or set train.global_batch_size to a multiple of {world_size}, e.g. "
            f"train.global_batch_size={multiple} (the batches, and so the results, then differ from the preset's)"
        )
    bigger = load_config("sd15_controlnet_canny", [*PATHS, "train.global_batch_size=16"], REQUIRED)
    assert (micro_batch_size(bigger, 16), gradient_accumulation_steps(bigger, 16)) == (1, 1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.micro_batch_size=most", "train.micro_batch_size='most' positive or auto"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0 positive or auto"),
        ("train.max_micro_batch_size=0", "train.max_micro_batch_size must be >= 1"),
        ("train.collective_timeout_minutes=0", "train.collective_timeout_minutes > 0"),
    ],
)
def test_bad_batch_and_timeout_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [*PATHS, override], REQUIRED)
