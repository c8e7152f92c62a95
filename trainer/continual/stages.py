"""The stages file of a continual run (launch/continual.py): a typed schema, YAML values, `key=value` overrides.

Same rules as the run config (trainer/config/): unknown keys are errors, and every check runs before any work
with a message naming the key and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError, ValidationError

from data.formats import open_shard_set
from data.images import list_image_folder
from data.shards import ShardError
from models.dit_weights import open_weights
from trainer.config import ConfigError, load_config

MODES = ("evolving", "fixed", "finetune")  # Diff-Tuning with an evolving bank; with a fixed bank; plain fine-tuning
REFRESH_FROM = ("previous", "initial")


@dataclass
class StageConfig:
    name: str = ""  # for the table; default stage_NN
    target: str = ""  # shard directory of this stage's target data (with meta "classes": the class names)
    images: str = ""  # or an ImageFolder (one subfolder per class), prepared by the driver into
    # run_dir/stage_NN/target_prepared with the run config's prepare.* settings (give target or images)
    steps: int = 0  # training steps of this stage
    eval_data: str | None = None  # shards of this stage's held-out images; the evaluation accumulates them
    overrides: list[str] = field(default_factory=list)  # key=value run-config overrides for this stage only


@dataclass
class BankPolicy:
    size: int = 5000  # samples in every stage's bank
    keep: float = 0.6  # share of the previous stage's bank kept (the rest is generated anew)
    refresh_from: str = "previous"  # previous: the model of the stage just trained | initial: the pre-trained model
    seed: int = 0  # the kept subset of stage k comes from (seed, k); the new samples' noise from seed + k


@dataclass
class StagesFile:
    pretrained: str = ""  # the initial pre-trained model folder (model.pretrained of stage 1)
    config: str = "tiny_cpu"  # the run-config preset or YAML every stage starts from
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that config, for every stage
    mode: str = "evolving"
    replay: float = 0.0  # share of each earlier stage's real target samples added to a stage's target (seeded)
    run_dir: str = "runs/continual"  # one folder for every stage: run_dir/stage_01/...
    bank: BankPolicy = field(default_factory=BankPolicy)
    stages: list[StageConfig] = field(default_factory=list)


def load_stages(path: str | None, overrides: list[str] = ()) -> StagesFile:
    """Schema <- YAML <- `key=value` overrides (e.g. mode=finetune), then the checks; nothing is written."""
    cfg = OmegaConf.structured(StagesFile)
    OmegaConf.set_struct(cfg, True)
    try:
        if path:
            if not Path(path).is_file():
                raise ConfigError(
                    f"--stages {path}: no such file; give a stages YAML, e.g. configs/continual/digits.yaml"
                )
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for override in overrides:  # one at a time: `stages.1.steps=8` indexes into the list of stages
            key, separator, value = override.partition("=")
            if not separator:
                raise ConfigError(f"override {override!r} is not key=value, e.g. mode=finetune or stages.0.steps=8")
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)
    except (ConfigAttributeError, ConfigKeyError, ValidationError, ConfigTypeError, IndexError) as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"stages file key '{key}': {str(getattr(err, 'msg', err)).splitlines()[0]}. "
            "Valid keys are the fields of trainer/continual/stages.py (pretrained, config, overrides, mode, run_dir, "
            "bank.*, "
            "stages[i].target/images/steps/eval_data/overrides/name)"
        ) from None
    stages: StagesFile = OmegaConf.to_object(cfg)
    check_stages(stages)
    return stages


def check_stages(stages: StagesFile) -> None:
    """Every rule that needs no run directory: values, files, and that each stage's data fits the model."""
    if stages.mode not in MODES:
        raise ConfigError(f"mode={stages.mode!r} is not one of {MODES}")
    if stages.bank.refresh_from not in REFRESH_FROM:
        raise ConfigError(f"bank.refresh_from={stages.bank.refresh_from!r} is not one of {REFRESH_FROM}")
    if not 0.0 <= stages.bank.keep <= 1.0:
        raise ConfigError(f"bank.keep={stages.bank.keep} must lie in [0, 1] (the share of the previous bank kept)")
    if not 0.0 <= stages.replay <= 1.0:
        raise ConfigError(f"replay={stages.replay} must lie in [0, 1] (the share of earlier stages' targets replayed)")
    if stages.bank.size < 1 and stages.mode != "finetune":
        raise ConfigError(f"bank.size={stages.bank.size} must be at least 1 (or mode=finetune, which has no bank)")
    if not stages.pretrained or not Path(stages.pretrained).exists():
        raise ConfigError(f"pretrained={stages.pretrained!r}: point it to the local pre-trained model folder")
    if not stages.stages:
        raise ConfigError("stages: the list is empty; give at least one stage with a target and steps")
    base = stage_config(stages, 0, [])
    if base.model.family != "dit":
        raise ConfigError(f"model.family={base.model.family}: continual runs support model.family=dit for now")
    shape = model_sample_shape(stages.pretrained, base.model.dit.num_attention_heads)
    known: set[str] = set()  # the class names of the targets so far: the table a held-out set is sampled from
    for number, stage in enumerate(stages.stages):
        key = f"stages[{number}]"
        if bool(stage.target) == bool(stage.images):
            raise ConfigError(
                f"{key}.target and {key}.images are {'both' if stage.target else 'neither'} set: every stage needs "
                "its target data, either target (a shard directory) or images (an ImageFolder the driver prepares)"
            )
        if stage.steps < 1:
            raise ConfigError(f"{key}.steps={stage.steps} must be at least 1")
        stage_config(stages, number, [])  # its overrides are valid run-config keys
        if stage.target:
            known.update(check_stage_data(f"{key}.target", stage.target, shape))
        else:
            known.update(check_stage_images(f"{key}.images", stages, number, shape))
        if stage.eval_data:
            unknown = sorted(set(check_stage_data(f"{key}.eval_data", stage.eval_data, shape)) - known)
            if unknown:
                raise ConfigError(
                    f"{key}.eval_data={stage.eval_data} has classes {unknown} that no target of stages 0..{number} "
                    "brings, so the model has no label for them: evaluate a stage on classes it has seen"
                )


def stage_config(stages: StagesFile, number: int, extra: list[str]):
    """The run config of stage `number` (0-based): preset <- file overrides <- stage overrides <- `extra`."""
    stage = stages.stages[number]
    try:
        return load_config(stages.config, [*stages.overrides, *stage.overrides, *extra])
    except ConfigError as err:
        raise ConfigError(f"stages[{number}] (its config and overrides): {err}") from None


def model_sample_shape(pretrained: str, num_attention_heads: int) -> tuple[int, int, int]:
    """The sample shape of a DiT folder, read from its config (no weights loaded)."""
    folder = Path(pretrained)
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    source = open_weights(folder, num_attention_heads)
    try:
        c = source.config
        return (c["in_channels"], c["sample_size"], c["sample_size"])
    finally:
        source.close()


def check_stage_data(key: str, folder: str, shape: tuple[int, ...]) -> list[str]:
    """A stage's shards: readable, with class names, samples of the model's shape; returns the class names."""
    try:
        dataset = open_shard_set(folder, verify="size")
    except ShardError as err:
        raise ConfigError(f"{key}={folder}: {err}") from None
    try:
        classes = dataset.manifest.meta.get("classes")
        if not classes:
            raise ConfigError(
                f"{key}={folder}: its manifest has no class names (meta 'classes'), which the run's growing class "
                "table is keyed by; prepare the stage's images with launch/prepare_data.py"
            )
        found = tuple(dataset[0]["x"].shape) if len(dataset) else None
        if found != tuple(shape):
            raise ConfigError(
                f"{key}={folder}: samples have shape {found} but the model samples {tuple(shape)}: prepare this "
                "stage's data with the model's VAE and resolution"
            )
        return list(classes)
    finally:
        dataset.close()


def check_stage_images(key: str, stages: StagesFile, number: int, shape: tuple[int, ...]) -> list[str]:
    """A stage's ImageFolder: listable, and prepared at a resolution that gives the model's sample shape; returns
    the class names (its subfolders, sorted, as the prepare job names them)."""
    folder = stages.stages[number].images
    try:
        classes = list_image_folder(folder).classes
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}={folder}: {err}") from None
    cfg = stage_config(stages, number, [])
    vae = cfg.model.dit.vae or (Path(stages.pretrained) / "vae" if (Path(stages.pretrained) / "vae").is_dir() else None)
    factor, channels = 1, 3
    if vae is not None:
        vae_config = AutoencoderKL.load_config(str(vae))
        factor, channels = 2 ** (len(vae_config["block_out_channels"]) - 1), vae_config["latent_channels"]
    resolution = cfg.prepare.resolution
    got = (channels, resolution // factor, resolution // factor)
    if resolution % factor or got != tuple(shape):
        raise ConfigError(
            f"{key}={folder}: prepare.resolution={resolution} gives samples of shape {got} but the model samples "
            f"{tuple(shape)}: set prepare.resolution={shape[-1] * factor} in the stages file's overrides"
        )
    return classes


def fingerprint(stages: StagesFile) -> str:
    """What a run in progress must keep: the stages file without its debug.* overrides (fault injection)."""
    plain = OmegaConf.structured(stages)
    plain.overrides = [o for o in stages.overrides if not o.startswith("debug.")]
    for stage in plain.stages:
        stage.overrides = [o for o in stage.overrides if not o.startswith("debug.")]
    return hashlib.sha256(OmegaConf.to_yaml(plain).encode()).hexdigest()


def to_yaml(stages: StagesFile) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(stages))
