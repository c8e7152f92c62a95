"""Checkpoints: DeepSpeed's sharded state plus the EMA, and our own `latest` pointer.

Every rank writes its part (a collective); the pointer moves only after all ranks have finished, so a
crash during a save leaves the previous checkpoint the one that loads (invariant 3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.files import atomic_write_bytes
from trainer import distributed
from trainer.ema import EMA

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save(engine, ema: EMA, step: int, root: Path, rank: int) -> Path:
    tag = tag_of(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    if rank == 0:
        buffer = _serialise(ema.state_dict())
        atomic_write_bytes(Path(root) / tag / "ema.pt", buffer)
    distributed.barrier()  # every rank has written its shard of the engine state
    if rank == 0:
        atomic_write_bytes(Path(root) / LATEST, tag.encode())
    distributed.barrier()
    return Path(root) / tag


def load(engine, ema: EMA, root: Path) -> int:
    """Restores engine, optimizer, scheduler and EMA from the latest complete checkpoint; returns its step."""
    tag = latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root} (no '{LATEST}' pointer)")
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"--resume: checkpoint {Path(root) / tag} could not be loaded by DeepSpeed")
    ema.load_state_dict(torch.load(Path(root) / tag / "ema.pt", map_location="cpu", weights_only=True))
    return int(client_state["step"])


def _serialise(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()
