"""Data kinds: how a family's training data is prepared into shards and how its memory bank is generated.

A family names its kind (`data_kind`, a key of `DATA_KINDS`): DiT and its EDM and flow variants take class-labelled
image folders and generate class-conditional banks ("labels"); SD + ControlNet takes (image, caption, control)
triples and generates free samples with annotated controls ("controlnet"); SD3 takes (image, caption) pairs, caches
the captions' embeddings and generates banks for the null prompt ("text"). A new kind is one module here and one
entry in `DATA_KINDS`; the prepare and bank jobs do not change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from trainer.config import Config

# samples(indices, on_batch) -> the shard records of `indices`, calling on_batch(n) after each batch of n.
Samples = Callable[[range, Callable[[int], None]], Iterator[dict]]


class BankRecipe(NamedTuple):
    fields: dict[str, str]  # the shard fields and their encodings
    settings: dict[str, Any]  # what decides the samples' bytes (a rerun with others is refused)
    samples: Samples


class DataKind(Protocol):
    name: str

    def prepare(self, cfg: Config, rank: int, world: int, device: torch.device) -> Path:
        """Writes cfg.prepare.images as shards into cfg.data.target (every rank calls it); returns the folder."""

    def bank_recipe(self, cfg: Config, family: Any, device: torch.device) -> BankRecipe:
        """The fields, settings and sample generator of `family`'s bank, on `device`."""


# name -> module holding `KIND`, imported when used (the ControlNet kind pulls in the annotators).
DATA_KINDS: dict[str, str] = {
    "labels": "trainer.jobs.kinds.labels",
    "controlnet": "trainer.jobs.kinds.controlnet",
    "text": "trainer.jobs.kinds.text",
}


def data_kind(name: str) -> DataKind:
    if name not in DATA_KINDS:
        raise ValueError(f"unknown data kind {name!r} (a family's data_kind); known: {', '.join(DATA_KINDS)}")
    return importlib.import_module(DATA_KINDS[name]).KIND
