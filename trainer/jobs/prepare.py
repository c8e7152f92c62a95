"""Target data into shards: the prepare job, and what its data kinds (trainer/jobs/kinds/) share.

The family's data kind reads the input folder and writes the shards; every kind keeps indices stable across reruns
and numbers of ranks, encodes with a per-sample seed (`encode`), and writes the shards each rank owns with the same
restartable machinery as the memory bank (data/shard_jobs.py).
"""

from __future__ import annotations

from pathlib import Path

from models import family_class
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.jobs.kinds import data_kind


def prepare_data(cfg: Config) -> Path:
    """Writes cfg.prepare.images as shards into cfg.data.target; returns the folder."""
    for key in ("resolution", "samples_per_shard", "batch_size"):
        if getattr(cfg.prepare, key) < 1:
            raise ConfigError(f"prepare.{key}={getattr(cfg.prepare, key)} must be at least 1")
    if cfg.prepare.seed < 0:
        raise ConfigError(f"prepare.seed={cfg.prepare.seed} must be >= 0")
    rank, world, device = distributed.init()
    return data_kind(family_class(cfg.model.family).data_kind).prepare(cfg, rank, world, device)
