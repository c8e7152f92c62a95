"""The run configuration: a typed schema, YAML presets and `key=value` overrides (OmegaConf, struct mode).

YAML files hold values only; every cross-field rule lives in `check_config`, with a message that says
how to fix the problem.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from operator import attrgetter
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data.images import parse_background
from models import FAMILIES, family_class, family_entry
from models.noise import noise_process_class
from models.tuning import TUNING_METHODS
from trainer.config.schema import (  # noqa: F401 (the schema is part of this module's interface)
    CONVERGENCE_THRESHOLDS,
    MOVED_MODEL_KEYS,
    BankConfig,
    Config,
    DataConfig,
    DebugConfig,
    DiTModelConfig,
    EvalConfig,
    FluxModelConfig,
    MethodConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    PeftConfig,
    PrepareConfig,
    RunConfig,
    SD3ModelConfig,
    SDControlNetModelConfig,
    TrainConfig,
)
from trainer.errors import ConfigError
from trainer.loss import LOSS_WEIGHTINGS
from trainer.retention import RETENTION_METHODS, check_retention

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (`dit_xl2_paper`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} not found; presets are: {presets}")
    return path


def load_config(config_path: str | None = None, overrides: list[str] = (), required: tuple[str, ...] = ()) -> Config:
    """Schema <- YAML file <- `key=value` overrides, then the cross-field checks.

    `required` lists the keys this job needs set (e.g. training needs data.target, not prepare.images).
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    try:
        if config_path:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_preset(config_path)))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except (ConfigKeyError, ValidationError) as err:
        key = getattr(err, "full_key", None) or "?"
        if key in MOVED_MODEL_KEYS:
            moved = MOVED_MODEL_KEYS[key]
            raise ConfigError(f"config key '{key}' is now '{moved}' (each family has its own section)") from None
        raise ConfigError(
            f"config key '{key}': {str(getattr(err, 'msg', err)).splitlines()[0]}. "
            f"Valid keys are the fields of trainer/config/schema.py (e.g. train.global_batch_size)."
        ) from None
    missing = [key for key in required if not OmegaConf.select(cfg, key)]
    if missing:
        raise ConfigError(f"config keys {missing} must be set for this job, e.g. `{missing[0]}=/path/to/...`")
    config: Config = OmegaConf.to_object(cfg)
    check_config(config)
    return config


# The settings that take one of a few values (those of a registry are read from it in check_config).
CHOICES = {
    "model.sd_controlnet.control": ("canny", "sketch", "depth", "normal", "seg"),
    "model.class_init": ("reuse", "fresh", "grow"),
    "data.verify": ("sha256", "size", "none"),
    "data.format": ("wds", "mds"),
    "method.bank_count": ("round", "floor"),
    "method.timestep_weights": ("complement", "mirrored", "logsnr"),
    "method.bank_condition": ("null", "own"),
    "method.bank_levels": ("xi", "target"),
    "train.precision": ("fp32", "bf16"),
}


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {options}")


def check_family_section(model: ModelConfig) -> None:
    """A setting in the section of a family other than model.family would be ignored: refuse it."""
    own = family_entry(model.family).settings
    sections = {entry.settings for entry in FAMILIES.values() if entry.settings}
    for section in sorted(sections):
        default = asdict(type(getattr(model, section))())
        changed = [k for k, v in asdict(getattr(model, section)).items() if _plain(v) != _plain(default[k])]
        if section != own and changed:
            raise ConfigError(
                f"model.{section}.{changed[0]} is set, but model.family={model.family} reads model.{own or '(none)'}: "
                f"remove it, or set model.family to a family that reads model.{section}"
            )


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def check_config(cfg: Config) -> None:
    """Cross-field rules that need no files and no world size."""
    _choice(cfg.model.family, tuple(FAMILIES), "model.family")
    try:  # the family's noise process says which method and noise settings apply to its levels
        noise_process_class(family_entry(cfg.model.family).noise_process).check_settings(cfg.method, cfg.noise)
    except ValueError as err:
        raise ConfigError(f"model.family={cfg.model.family}: {err}") from None
    check_family_section(cfg.model)
    registered = {"method.loss_weighting": LOSS_WEIGHTINGS, "method.peft": tuple(TUNING_METHODS),
                  "method.retention": tuple(RETENTION_METHODS)}  # fmt: skip
    for key, options in {**CHOICES, **registered}.items():
        _choice(attrgetter(key)(cfg), options, key)
    if cfg.method.min_snr_gamma <= 0:
        raise ConfigError(
            f"method.min_snr_gamma={cfg.method.min_snr_gamma} must be > 0 (Min-SNR clips SNR(t) at gamma; "
            "the rebuttal uses 1 and 5)"
        )
    if cfg.method.p2_k <= 0 or cfg.method.p2_gamma < 0:
        raise ConfigError(
            f"method.p2_k={cfg.method.p2_k} must be > 0 (it bounds 1 / (k + SNR)^gamma at the noisiest steps) and "
            f"method.p2_gamma={cfg.method.p2_gamma} >= 0; P2's paper uses k=1 and gamma 0.5 or 1"
        )
    if cfg.peft.lora_rank < 1 or cfg.peft.difffit_blocks < 1 or cfg.peft.lr_scale <= 0:
        raise ConfigError("peft.lora_rank and peft.difffit_blocks must be >= 1 and peft.lr_scale > 0")
    if cfg.method.peft != "full" and cfg.eval.every:
        raise ConfigError(
            f"method.peft={cfg.method.peft} with eval.every={cfg.eval.every}: convergence tracking evaluates the "
            "full ControlNet only; set eval.every=0 or method.peft=full"
        )
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if cfg.train.precision == "bf16" and cfg.train.zero_stage == 0:
        raise ConfigError(
            "train.precision=bf16 with train.zero_stage=0 would build DeepSpeed's unpartitioned bf16 optimizer, "
            "which keeps a whole fp32 copy on every rank and checks every tensor on the host each step: set "
            "train.zero_stage=1 or 2 (one GPU included), or train.precision=fp32"
        )
    if not cfg.method.logsnr_width > 0 or (cfg.method.bank_max_t is not None and cfg.method.bank_max_t < 0):
        raise ConfigError(
            f"method.logsnr_width={cfg.method.logsnr_width} must be > 0 (the width of psi's rise in log-SNR) and "
            f"method.bank_max_t={cfg.method.bank_max_t} >= 0 (the last timestep the bank is drawn at), or unset"
        )
    if not 0.0 <= cfg.method.bank_ratio < 1.0:
        raise ConfigError(f"method.bank_ratio={cfg.method.bank_ratio} must be in [0, 1)")
    micro = cfg.train.micro_batch_size
    if cfg.train.global_batch_size < 1 or (micro != "auto" and not (isinstance(micro, int) and micro >= 1)):
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be positive and "
            f"train.micro_batch_size={micro!r} positive or auto"
        )
    if cfg.train.max_micro_batch_size < 1 or cfg.train.collective_timeout_minutes <= 0:
        raise ConfigError("train.max_micro_batch_size must be >= 1 and train.collective_timeout_minutes > 0")
    if not 0.0 <= cfg.method.label_dropout < 1.0:
        raise ConfigError(f"method.label_dropout={cfg.method.label_dropout} must be in [0, 1)")
    if cfg.eval.every < 0 or min(cfg.eval.num_controls, cfg.eval.num_steps, cfg.eval.batch_size) < 1:
        raise ConfigError("eval.every must be >= 0 and eval.num_controls, eval.num_steps, eval.batch_size >= 1")
    try:
        parse_background(cfg.prepare.background)
    except ValueError as err:
        raise ConfigError(
            f"prepare.background: {err}; e.g. prepare.background=white or prepare.background=0,0,0"
        ) from None
    check_retention(cfg)
    check_prior_preservation(cfg)
    if cfg.eval.every and cfg.model.family != "sd_controlnet":
        raise ConfigError(f"eval.every={cfg.eval.every}: convergence tracking is for model.family=sd_controlnet")


def check_prior_preservation(cfg: Config) -> None:
    """method.bank_condition=own / bank_levels=target (DreamBooth's prior preservation) replay a bank's samples."""
    m = cfg.method
    if (m.bank_condition, m.bank_levels) == ("null", "xi"):
        return
    if m.retention != "bank":
        raise ConfigError(
            f"method.bank_condition={m.bank_condition} and method.bank_levels={m.bank_levels} shape the slots of a "
            f"bank, but method.retention={m.retention} distils on the target set: set method.retention=bank"
        )
    labels = family_class(cfg.model.family).condition_fields == ("label",)
    if m.bank_condition == "own" and labels and cfg.model.num_classes and cfg.model.class_init != "grow":
        raise ConfigError(
            f"method.bank_condition=own: the bank's labels are pre-trained class ids, which model.num_classes="
            f"{cfg.model.num_classes} with model.class_init={cfg.model.class_init} replaces; keep them with "
            "model.class_init=grow (or model.num_classes=0), or set method.bank_condition=null"
        )


# The noise settings that define the training distribution of the levels (sigma_data only preconditions).
PLAN_NOISE_SETTINGS = ("p_mean", "p_std", "t_distribution", "logit_mean", "logit_std", "shift")


def plan_settings(cfg: Config) -> dict:
    """The settings that define the sequence of global batches: a resume must keep them."""
    m = cfg.method
    return {
        "train.global_batch_size": cfg.train.global_batch_size, "train.seed": cfg.train.seed,
        "method.bank_ratio": m.bank_ratio, "method.bank_count": m.bank_count, "method.tau": m.tau,
        "method.timestep_weights": m.timestep_weights, "method.bank_tau": m.bank_tau,
        "method.label_dropout": m.label_dropout, "method.logsnr_center": m.logsnr_center,
        "method.logsnr_width": m.logsnr_width, "method.bank_max_t": m.bank_max_t,
        "method.bank_condition": m.bank_condition, "method.bank_levels": m.bank_levels,
        **{f"noise.{key}": getattr(cfg.noise, key) for key in PLAN_NOISE_SETTINGS},
    }  # fmt: skip


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """train.micro_batch_size on `world_size` ranks; `auto`: the largest divisor of the rank's share of the global
    batch that is at most train.max_micro_batch_size."""
    batch = cfg.train.global_batch_size
    if batch % world_size:
        divisors = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        multiple = world_size * -(-batch // world_size)
        raise ConfigError(
            f"train.global_batch_size={batch} cannot be split over {world_size} ranks: run on a number of GPUs "
            f"that divides it ({divisors}), or set train.global_batch_size to a multiple of {world_size}, e.g. "
            f"train.global_batch_size={multiple} (the batches, and so the results, then differ from the preset's)"
        )
    if cfg.train.micro_batch_size != "auto":
        return int(cfg.train.micro_batch_size)
    share = batch // world_size
    return max(n for n in range(1, min(share, cfg.train.max_micro_batch_size) + 1) if share % n == 0)


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Global batch = world size x micro-batch x accumulation; anything else is refused."""
    micro = micro_batch_size(cfg, world_size)
    per_step = world_size * micro
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"ranks x train.micro_batch_size = {world_size} x {micro} = {per_step}; "
            "set train.micro_batch_size=auto, or pick a micro-batch size (or number of ranks) whose product "
            "divides the global batch"
        )
    return cfg.train.global_batch_size // per_step


def with_micro_batch(cfg: Config, world_size: int) -> Config:
    """A copy of `cfg` with train.micro_batch_size resolved to a number for `world_size` ranks (`auto` resolved)."""
    gradient_accumulation_steps(cfg, world_size)  # refuses a batch that does not split
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro_batch_size(cfg, world_size)))


def describe_batch(cfg: Config, world_size: int) -> str:
    """One line for the start of a run: how the global batch is laid out."""
    auto = " (train.micro_batch_size=auto)" if cfg.train.micro_batch_size == "auto" else ""
    return (
        f"global batch {cfg.train.global_batch_size} = {world_size} ranks x micro-batch "
        f"{micro_batch_size(cfg, world_size)}{auto} x {gradient_accumulation_steps(cfg, world_size)} accumulation steps"
    )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
