"""What keeps the pre-trained knowledge while the model adapts: bank replay, or distillation from the frozen model.

A retention method fills the retention share of each global batch (`round(B * method.bank_ratio)` slots, the
plan's source `RETENTION`, always with the null condition and `t ~ xi`): it names the data set those slots read
(`open_source`), readies what its loss needs once the device is known (`prepare`), and turns the micro-batch's
per-slot losses of the pre-trained objective into its own (`slot_losses`); the loop weighs its slots by
`loss_weight / (global number of retention slots)`. Adding a method is one module here and one entry in
`RETENTION_METHODS`; the loop, the planner and the metrics do not change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from data.sampler import BANK
from models.family import to_device

if TYPE_CHECKING:
    from data.batch import MicroBatch
    from data.shards import ShardDataset

# The trainer's Config: trainer.config validates through this registry, so it is not imported back here.
Config = Any

RETENTION = BANK  # the plan's source id of the retention slots (the bank's, for which the plan was made)


@runtime_checkable
class Retention(Protocol):
    name: str  # names its slots in the logs (`loss/<name>`) and its data set in the resume plan (`data.num_<name>`)
    source_key: str  # the config key of the data set its slots read, for error messages
    loss_weight: float  # lambda: the retention slots weigh loss_weight / (global number of retention slots)

    def open_source(self, target: ShardDataset, verify: str) -> ShardDataset | None:
        """The data set the retention slots read (`target` is the opened data.target), or None for no slots;
        a data set it opens is checked as `verify` says (a data.verify mode)."""

    def prepare(self, device: torch.device, dtype: torch.dtype, load_pretrained: Callable[[], Any]) -> None:
        """Readies what `slot_losses` needs on the training device, in the training precision (after DeepSpeed
        set up the model); `load_pretrained()` builds the frozen pre-trained family, for a method that needs it."""

    def slot_losses(
        self,
        objective: torch.Tensor,
        output: torch.Tensor,
        model_input: torch.Tensor,
        model_level: torch.Tensor,
        batch: MicroBatch,
    ) -> torch.Tensor:
        """Per-slot losses of the micro-batch: `objective` (the pre-trained objective of every slot, float32) with
        this method's own loss in the retention slots' places. `output` is the student's prediction on
        the network input `model_input` at `model_level` (the noise process's: x_t and t for DDPM).
        Device arithmetic only: which slots are retention slots is read from the host-side `batch.ids`."""


def _lazy(module: str, attribute: str) -> Callable[[Config], Retention]:
    """Imports a method's module only when it is used."""

    def build(cfg: Config) -> Retention:
        return getattr(importlib.import_module(f"trainer.retention.{module}"), attribute)(cfg)

    return build


def _check(module: str, attribute: str) -> Callable[[Config], None]:
    def check(cfg: Config) -> None:
        getattr(importlib.import_module(f"trainer.retention.{module}"), attribute).check(cfg)

    return check


# name -> (build from the config, check the config: raises ConfigError naming the keys and the fix)
RETENTION_METHODS: dict[str, tuple[Callable[[Config], Retention], Callable[[Config], None]]] = {
    "bank": (_lazy("bank", "BankReplay"), _check("bank", "BankReplay")),
    "kd": (_lazy("kd", "Distillation"), _check("kd", "Distillation")),
}


def retention_method(cfg: Config) -> Retention:
    """The method of `method.retention`, configured from `cfg`."""
    name = cfg.method.retention
    if name not in RETENTION_METHODS:
        raise ValueError(f"method.retention={name!r} is not one of {tuple(RETENTION_METHODS)}")
    return RETENTION_METHODS[name][0](cfg)


def check_retention(cfg: Config) -> None:
    """The method's own cross-field rules (config.check_config calls it): ConfigError with the reason and the fix."""
    RETENTION_METHODS[cfg.method.retention][1](cfg)


def retention_rows(batch: MicroBatch, device: torch.device) -> torch.Tensor:
    """Positions of the micro-batch's retention slots, from the host-side ids (no read of a device tensor)."""
    rows = torch.from_numpy((batch.ids[:, 1] == RETENTION).nonzero()[0])
    return to_device(rows, device)
