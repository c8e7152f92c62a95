"""Starting the EMA from other weights than the run's own: a continual stage carries the previous stage's EMA on."""

from __future__ import annotations

from dataclasses import replace

import torch

from trainer.config import Config, ConfigError
from trainer.ema import ShardedEMA
from trainer.setup import load_family


@torch.no_grad()
def start_ema_from(ema: ShardedEMA, cfg: Config) -> None:
    """Fills this rank's EMA slice from the model folder cfg.model.ema_from, loaded the way model.pretrained is
    (same label space and class_init, so grown label rows match). The folder is read whole on every rank, once.
    Trained parameters the folder does not hold (a LoRA's adapters) start as the run's own weights."""
    source = load_family(replace(cfg, model=replace(cfg.model, pretrained=cfg.model.ema_from)))
    state = source.denoiser.state_dict()
    for name, fragment in ema.fragments.items():
        if name not in state:
            continue
        whole = state[name]
        if tuple(whole.shape) != tuple(ema.shapes[name]):
            raise ConfigError(
                f"model.ema_from={cfg.model.ema_from}: {name} has shape {tuple(whole.shape)} but the model trains "
                f"{tuple(ema.shapes[name])}; point it to the EMA of the model in model.pretrained"
            )
        values = whole.reshape(-1).narrow(0, fragment.start, fragment.numel).to(ema.shadow[fragment.flat])
        ema.shadow[fragment.flat].view(-1).narrow(0, fragment.offset, fragment.numel).copy_(values)
