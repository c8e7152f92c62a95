"""Bank replay (the paper's retention): the retention slots read the memory bank, samples the pre-trained model
generated once (data.bank), and train on them with the pre-trained objective itself, weighted by lambda
(method.bank_loss_weight)."""

from __future__ import annotations

import torch

from data.formats import open_shard_set
from trainer.errors import ConfigError


class BankReplay:
    name = "bank"
    source_key = "data.bank"

    def __init__(self, cfg):
        self.bank, self.ratio = cfg.data.bank, cfg.method.bank_ratio
        self.loss_weight = cfg.method.bank_loss_weight

    @staticmethod
    def check(cfg) -> None:
        """Nothing to check without files: whether data.bank is needed is known when the sources open."""

    def open_source(self, target, verify: str):
        if self.ratio == 0:
            return None  # plain fine-tuning: no retention slots
        if not self.bank:
            raise ConfigError(
                f"method.bank_ratio={self.ratio} needs a memory bank: set data.bank=/path/to/bank "
                "(made by launch/generate_bank.py), or method.bank_ratio=0 for plain fine-tuning"
            )
        return open_shard_set(self.bank, verify=verify)

    def prepare(self, device: torch.device, dtype: torch.dtype, load_pretrained) -> None:
        pass  # the bank is data: nothing to build

    def slot_losses(self, objective: torch.Tensor, output, model_input, model_level, batch) -> torch.Tensor:
        return objective  # bank samples train with the pre-trained objective, as the target samples do
