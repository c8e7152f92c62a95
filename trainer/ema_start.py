"""Starting the EMA from other weights than the run's own: a continual stage carries the previous stage's EMA on.

The folder is streamed one tensor at a time (safetensors `safe_open`, or a memory-mapped `.pt`) into the slice of
the EMA each rank owns, so no rank ever holds the folder whole (DESIGN invariant 7), under any ZeRO stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.dit_weights import WeightSource, open_weights, relabelled
from trainer.config import Config, ConfigError
from trainer.ema import ShardedEMA


def start_ema_from(ema: ShardedEMA, cfg: Config) -> None:
    """Fills this rank's EMA slice from the model folder cfg.model.ema_from, read the way model.pretrained is
    (same label space, class_init and seed, so grown label rows match). Trained parameters the folder does not
    hold (a LoRA's adapters) start as the run's own weights."""
    m = cfg.model
    fill_ema_from_folder(
        ema, Path(m.ema_from), num_classes=m.num_classes, class_init=m.class_init, seed=cfg.train.seed,
        num_attention_heads=m.dit.num_attention_heads, key=f"model.ema_from={m.ema_from}",
    )  # fmt: skip


@torch.no_grad()
def fill_ema_from_folder(
    ema: ShardedEMA, folder: Path, *, num_classes: int = 0, class_init: str = "reuse", seed: int = 0,
    num_attention_heads: int = 16, key: str = "model.ema_from",
) -> None:  # fmt: skip
    """Every rank reads each trained parameter's tensor in turn (all ranks check every shape, so all fail alike)
    and copies only the elements of its own fragment; the tensor is released before the next is read."""
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    try:
        source = relabelled(open_weights(folder, num_attention_heads), num_classes, class_init, seed)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    try:
        available = set(source.names)
        for name in ema.shapes:
            if name in available:
                _copy_fragment(ema, source, name, key)
    finally:
        source.close()


def _copy_fragment(ema: ShardedEMA, source: WeightSource, name: str, key: str) -> None:
    """One tensor: read, checked, this rank's elements copied; it goes out of scope on return."""
    whole = source.read(name)
    if tuple(whole.shape) != tuple(ema.shapes[name]):
        raise ConfigError(
            f"{key}: {name} has shape {tuple(whole.shape)} but the model trains {tuple(ema.shapes[name])}; point "
            "it to the EMA of the model in model.pretrained"
        )
    fragment = ema.fragments.get(name)  # None: no element of this parameter in this rank's slice
    if fragment is not None:
        values = whole.reshape(-1).narrow(0, fragment.start, fragment.numel)
        ema.shadow[fragment.flat].view(-1).narrow(0, fragment.offset, fragment.numel).copy_(values)
