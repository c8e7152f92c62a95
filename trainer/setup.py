"""Everything a run checks and opens before its first step: bad input stops here, before any work."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.composed import is_composed, read_composed
from data.formats import ShardFormat, open_shard_set, shard_format
from data.sampler import TARGET, GlobalBatchPlanner
from data.shards import ShardDataset, ShardError, ShardRecord, read_manifest
from models import family_entry
from models.dit_weights import copy_into_parameter
from models.tuning import TuningMethod, describe, tuning_method
from trainer import distributed
from trainer.config import Config, ConfigError, gradient_accumulation_steps, plan_settings, to_yaml
from trainer.retention import RETENTION, Retention, retention_method


def load_family(cfg: Config, num_classes: int | None = None, *, training: bool = False):
    """The model family of cfg.model; `num_classes=0` keeps DiT's pre-trained label space (bank, prepare).

    `training=True` (the training job, after the process group is up) builds a DiT under `deepspeed.zero.Init`
    when train.zero_stage=3, so that no rank ever holds all its weights, and applies train.activation_checkpointing
    and train.compile to the denoiser. TF32 (train.tf32) is set for every job.
    """
    set_tf32(cfg.train.tf32)
    m, entry = cfg.model, family_entry(cfg.model.family)
    build_context, load_parameter = (
        zero3_build(cfg) if training and cfg.train.zero_stage == 3 else (nullcontext, copy_into_parameter)
    )
    settings = asdict(getattr(m, entry.settings)) if entry.settings else {}  # the family's own section
    continuous = {"noise": cfg.noise} if entry.noise_process != "ddpm" else {}
    family = entry.load().from_pretrained(
        m.pretrained, num_classes=m.num_classes if num_classes is None else num_classes, class_init=m.class_init,
        seed=cfg.train.seed, build_context=build_context, load_parameter=load_parameter, **settings, **continuous,
    )  # fmt: skip
    if training:
        apply_activation_checkpointing(family.denoiser, cfg.train.activation_checkpointing)
    if training and cfg.train.compile:
        family.compile_blocks()
    return family


def apply_activation_checkpointing(
    denoiser: torch.nn.Module, enabled: bool, checkpoint_function: Callable | None = None
) -> None:
    """train.activation_checkpointing: the trained denoiser recomputes each block's activations in its backward.

    Only the denoiser: frozen parts the gradients flow through (SD's UNet, under a ControlNet) keep theirs, so
    they cost their whole activations either way. The memory plan (trainer/benchmark/memory_plan.py) calls this
    same function, with its own `checkpoint_function` to measure the recomputation, so that it plans what runs."""
    if not enabled:
        denoiser.disable_gradient_checkpointing()
    elif checkpoint_function is None:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (no effect on the CPU), as DiT's train.py sets it."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def zero3_build(cfg: Config) -> tuple[Callable[[], AbstractContextManager], Callable]:
    """How a ZeRO-3 run builds its denoiser: partitioned as it is built (`deepspeed.zero.Init` with the run's
    DeepSpeed config), each pre-trained tensor written by rank 0 into the gathered parameter and re-partitioned."""
    import deepspeed
    import torch.distributed as dist

    from trainer.engine import deepspeed_config

    ds_config = deepspeed_config(cfg, gradient_accumulation_steps(cfg, dist.get_world_size()))
    rank = dist.get_rank()

    def load_parameter(parameter: torch.nn.Parameter, tensor: torch.Tensor) -> None:
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if rank == 0:
                copy_into_parameter(parameter, tensor)

    return (lambda: deepspeed.zero.Init(config_dict_or_path=ds_config)), load_parameter


def apply_tuning(cfg: Config, family, rank: int) -> TuningMethod:
    """Applies method.peft to the family's denoiser (before EMA and DeepSpeed see it); rank 0 prints the tunable set."""
    tuning = tuning_method(cfg.method.peft, cfg.peft)
    try:
        tuning.apply(family.denoiser)
    except ValueError as err:
        raise ConfigError(f"method.peft={cfg.method.peft} on model.family={family.name}: {err}") from None
    if rank == 0:
        print(describe(tuning, family.denoiser), flush=True)
    return tuning


def build_planner(cfg: Config, family, sources: dict[int, ShardDataset]) -> GlobalBatchPlanner:
    """Retention slots (bank samples, or KD's re-read target images) take method.bank_ratio of each global batch."""
    return GlobalBatchPlanner(
        global_batch_size=cfg.train.global_batch_size, num_target=len(sources[TARGET]),
        num_bank=len(sources[RETENTION]) if RETENTION in sources else 0, bank_ratio=cfg.method.bank_ratio,
        bank_rounding=cfg.method.bank_count, label_dropout=cfg.method.label_dropout, seed=cfg.train.seed,
        split=family.noise_process.split(cfg.method),
        retention_name=cfg.method.retention, bank_null_condition=cfg.method.bank_condition == "null",
        bank_levels=cfg.method.bank_levels,
    )  # fmt: skip


def run_plan(cfg: Config, planner: GlobalBatchPlanner) -> dict:
    """The global-batch settings a resume must keep, the data set sizes included."""
    return {**plan_settings(cfg), **{f"data.num_{k}": v for k, v in planner.source_sizes_by_name().items()}}


def create_run_dir(run_dir: Path, cfg: Config, overwrite: bool) -> None:
    """Rank 0, after every rank passed its checks."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


def truncate_ledger(run_dir: Path, step: int) -> None:
    """On resume, the ledger keeps what the checkpoint committed: the steps before `step`."""
    for path in (run_dir / "ledger").glob("rank*.jsonl"):
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < step]
        path.write_text("".join(line + "\n" for line in kept))


def read_directories(cfg: Config, retention: Retention) -> list[str]:
    """The shard sets the run reads: data.target, and the retention's (its `source_key`) when it has slots."""
    directories = [cfg.data.target]
    if cfg.method.bank_ratio > 0:
        directories.append(getattr(cfg.data, retention.source_key.removeprefix("data.")))
    return list(dict.fromkeys(d for d in directories if d))


def shard_files(directory: str | Path) -> list[tuple[Path, ShardRecord, ShardFormat]]:
    """(path, manifest record, format) of every shard of a shard set, through the parts of a composed set."""
    if is_composed(directory):
        return [entry for part in read_composed(directory).parts for entry in shard_files(part.path)]
    manifest = read_manifest(directory)
    fmt = shard_format(manifest.meta.get("format", "wds"))
    return [(Path(directory) / record.name, record, fmt) for record in manifest.shards]


def verify_shards(directories: list[str], rank: int, world_size: int) -> None:
    """Hashes shard i (of all the sets' shards) on rank i mod `world_size` only, then the ranks agree (a collective
    when `world_size` > 1): a bad shard stops every rank, named by the rank that found it, before any work."""
    shards = {path: (record, fmt) for directory in directories for path, record, fmt in shard_files(directory)}
    error = None
    for path, (record, fmt) in list(shards.items())[rank::world_size]:
        digest = fmt.digest(path) if path.exists() else None
        # A missing or resized shard is named by every rank's open (its size check), after this.
        if digest is not None and digest[0] == record.num_bytes and digest[1] != record.sha256:
            error = (
                f"shard {path} fails its sha256 check against the manifest (corrupt or changed; found by rank "
                f"{rank}); re-run the job that wrote it (launch/prepare_data.py or launch/generate_bank.py)"
            )
            break
    error = distributed.first_error(error) if world_size > 1 else error
    if error:
        raise ShardError(error)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty: pass --resume to continue it, "
            "--overwrite to replace it, or set run.dir to a new folder (nothing in it was touched)"
        )


def open_sources(
    cfg: Config, family, retention: Retention | None = None, rank: int = 0, world_size: int = 1
) -> dict[int, ShardDataset]:
    """Opens (and checks against their manifests) the target shards and the data set the retention slots read
    (the bank; none for plain fine-tuning).

    With data.verify=sha256 each shard is hashed once in all, split across the ranks (`verify_shards`), before
    every rank opens the sets checking sizes and structure (cheap)."""
    retention = retention or retention_method(cfg)
    if cfg.data.verify == "sha256":
        verify_shards(read_directories(cfg, retention), rank, world_size)
    opening = "size" if cfg.data.verify == "sha256" else cfg.data.verify
    sources = {TARGET: open_shard_set(cfg.data.target, verify=opening)}
    retained = retention.open_source(sources[TARGET], opening)
    if retained is not None:
        sources[RETENTION] = retained
    for source, key in ((TARGET, "data.target"), (RETENTION, retention.source_key)):
        if source not in sources:
            continue
        dataset = sources[source]
        shape = tuple(np.shape(dataset[0]["x"])) if "x" in dataset.manifest.fields and len(dataset) else None
        if shape != tuple(family.sample_shape):
            raise ConfigError(
                f"{key}: the samples' field 'x' has shape {shape} but the model expects "
                f"{tuple(family.sample_shape)}: prepare the shards with this model's VAE and resolution"
            )
        try:
            family.check_data(dataset[0], dataset.manifest.meta, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    classes = sources[TARGET].manifest.meta.get("classes")
    if classes is not None and len(classes) > family.null_condition:
        raise ConfigError(
            f"the target data has {len(classes)} classes but the model's label space has "
            f"{family.null_condition}: set model.num_classes={len(classes)}"
        )
    return sources
