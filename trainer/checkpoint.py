"""Checkpoints: DeepSpeed's sharded state, the EMA, our run state, and our own `latest` pointer.

Every rank writes its part (a collective); the pointer moves only after all ranks have finished, so a
crash during a save leaves the previous checkpoint the one that loads (invariant 3). Older checkpoints are
pruned only after a newer one is complete. A resume on a different number of ranks goes through
DeepSpeed's universal checkpoint, converted once from the saved one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from data.files import atomic_write_bytes
from trainer import distributed
from trainer.config import ConfigError
from trainer.ema import ShardedEMA

LATEST = "latest"
META = "run_state.json"


@dataclass
class RunState:
    """What a resumed run must know besides weights: the data side's state is the step number."""

    step: int = 0  # global steps done (the next step to run)
    applied_steps: int = 0  # steps whose update was applied (drives the LR schedule)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    world_size: int = 1
    partitioned: bool = False  # optimizer state sharded over ranks (ZeRO >= 1 or bf16)
    plan: dict = field(default_factory=dict)  # the settings that define the global batches


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def read_state(root: Path) -> RunState | None:
    tag = latest_tag(root)
    return None if tag is None else RunState(**json.loads((Path(root) / tag / META).read_text()))


def save(
    engine, ema: ShardedEMA, state: RunState, root: Path, rank: int, keep_last: int = 0, crash_after_write=None
) -> Path:
    """A collective: every rank writes its shard; then rank 0 moves `latest` and prunes."""
    tag = tag_of(state.step)
    # universal_checkpoint_info lets DeepSpeed convert this checkpoint for a different number of ranks.
    # Frozen weights (PEFT) stay out of the checkpoint: a resume takes them from model.pretrained.
    engine.save_checkpoint(
        str(root), tag=tag, client_state={"universal_checkpoint_info": {}}, save_latest=False,
        exclude_frozen_parameters=bool(_frozen(engine)),
    )  # fmt: skip
    ema.save(Path(root) / tag, rank)  # each rank its own fragments (of the trained parameters only)
    if rank == 0:
        atomic_write_bytes(Path(root) / tag / META, json.dumps(asdict(state), indent=1).encode())
    if crash_after_write is not None:
        crash_after_write()  # tests: a rank dying after its write, before every rank has finished
    distributed.barrier()  # every rank has written its part
    if rank == 0:
        atomic_write_bytes(Path(root) / LATEST, tag.encode())
        _prune(Path(root), keep_last)
    distributed.barrier()
    return Path(root) / tag


def resume_plan(root: Path, world_size: int, partitioned: bool, plan: dict, allow_plan_change: bool):
    """(state, load_universal) for a resume, or (None, False) when there is nothing to resume.

    Refuses, with the reason, a resume whose global batches would differ from the saved run's. A collective:
    rank 0 reads the `latest` pointer and the state, the others get them (one reader of a shared folder, and every
    rank resumes the same tag even if the pointer moves meanwhile).
    """
    state = distributed.from_rank0(lambda: read_state(root))
    if state is None:
        return None, False
    changed = {k: (state.plan.get(k), v) for k, v in plan.items() if state.plan.get(k) != v}
    if changed and not allow_plan_change:
        listed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"--resume: the run in {root.parent} was trained with other global-batch settings ({listed}); "
            "the resumed run would not be the run that was started. Restore them, or pass "
            "run.allow_plan_change=true to continue with the new ones on purpose"
        )
    universal = state.world_size != world_size and (state.partitioned or partitioned)
    return state, universal


def load(engine, ema: ShardedEMA, root: Path, state: RunState, universal: bool, rank: int) -> None:
    """Restores engine, optimizer and EMA from the checkpoint of `state` (resume_plan's; a collective)."""
    saved = tag = tag_of(state.step)
    if universal:
        tag = _universal_copy(Path(root), saved, rank)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not _frozen(engine))
    if path is None:
        raise FileNotFoundError(f"--resume: checkpoint {Path(root) / tag} could not be loaded by DeepSpeed")
    ema.load(Path(root) / saved, rank)  # the saved tag: a universal copy holds no EMA


def _frozen(engine) -> set[str]:
    """Names of the parameters that do not train (PEFT)."""
    return {name for name, p in engine.module.named_parameters() if not p.requires_grad}


def _universal_copy(root: Path, tag: str, rank: int) -> str:
    """Converts `tag` to DeepSpeed's universal format once (rank 0, atomically); returns the new tag."""
    universal = f"{tag}_universal"
    if rank == 0 and not (root / universal).is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = root / f".{universal}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(SimpleNamespace(
            input_folder=str(root / tag), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False,
        ))  # fmt: skip
        os.replace(tmp, root / universal)
    # DeepSpeed's tool converts on one process; the others wait here, for up to train.collective_timeout_minutes.
    distributed.barrier()
    return universal


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
    for tag in tags[:-keep_last]:
        for path in (root / tag, root / f"{tag}_universal"):
            shutil.rmtree(path, ignore_errors=True)
