"""The one place that knows about ranks: process-group set-up, reductions, and gathering ZeRO-3 weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

T = TypeVar("T")


def launcher_rank() -> int:
    """This process's rank as its launcher numbered it, also before `init`: RANK (deepspeed, torchrun) or, under
    srun, SLURM_PROCID."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def device_ordinal(local_rank: int, visible_devices: str | None) -> int:
    """The index of this rank's device among those it sees. A task that sees one GPU only (srun --gpu-bind,
    --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per task) has it as device 0, whatever its local rank; a
    process that sees the node's GPUs (deepspeed's launcher, torchrun, plain srun) takes the one of its local rank."""
    if visible_devices is not None and len([d for d in visible_devices.split(",") if d.strip()]) == 1:
        return 0
    return local_rank


def init(timeout_minutes: float = 30.0) -> tuple[int, int, torch.device]:
    """Joins the process group set up by the launcher (deepspeed, torchrun, srun) or starts a group of one.

    `timeout_minutes` bounds every collective (train.collective_timeout_minutes): a rank waiting longer for
    the others fails instead of hanging; it must cover the longest wait of a run (a save, an export).
    """
    # Under `srun`, SLURM numbers the tasks; MASTER_ADDR/PORT come from the sbatch script.
    os.environ.setdefault("RANK", str(launcher_rank()))
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    # DeepSpeed takes LOCAL_RANK for the device index (the engine, zero.Init, the NCCL device id), so it becomes
    # the device's ordinal: 0 for a task bound to one GPU, where SLURM_LOCALID would name a device it cannot see.
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    os.environ["LOCAL_RANK"] = str(device_ordinal(local_rank, os.environ.get("CUDA_VISIBLE_DEVICES")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(minutes=timeout_minutes))
    global _host_group
    # Host-side flags (preemption) are reduced over gloo on the CPU, beside the device's collectives, so
    # that agreeing on them never waits for the device.
    if _host_group is None:  # once per process group: jobs run one after another in a process call init again
        _host_group = (
            dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
            if dist.get_backend() != "gloo" else dist.group.WORLD
        )  # fmt: skip
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(), local_rank)
    return dist.get_rank(), dist.get_world_size(), device


_host_group = None


def world_size() -> int:
    return dist.get_world_size()


def start_host_sum(tensor: torch.Tensor):
    """Starts summing a CPU tensor over ranks without waiting (gloo); returns the work to `wait()` on."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_host_group, async_op=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on one (so all ranks take the same branch)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    dist.barrier()


def from_rank0(read: Callable[[], T]) -> T:
    """Rank 0 calls `read` (e.g. reads a file); every rank gets its result, or raises its exception, so the other
    ranks neither read the file themselves nor hang when rank 0 fails (a collective, on the host group)."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(read(), None)]
        except Exception as err:  # raised on every rank below
            box = [(None, err)]
    dist.broadcast_object_list(box, src=0, group=_host_group)
    value, err = box[0]
    if err is not None:
        raise err
    return value


def first_error(message: str | None) -> str | None:
    """The first rank's error message, on every rank (None when no rank has one): a check split across ranks
    ends with all of them taking the same branch, and the message names what the rank that found it found."""
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_host_group)
    return next((m for m in messages if m), None)


@contextmanager
def full_parameters(module: torch.nn.Module):
    """Inside, every rank sees the full parameters, also under ZeRO-3 (a collective: call on all ranks)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def destroy() -> None:
    """Leaves the process group and frees this rank's shared-memory buffer of DeepSpeed's CPU all-reduce
    (about 69 MB in /dev/shm, otherwise left behind when the process ends)."""
    if not dist.is_initialized():
        return
    global _host_group
    rank, port = dist.get_rank(), os.environ.get("MASTER_PORT", "")
    dist.destroy_process_group()
    _host_group = None
    for buffer in Path("/dev/shm").glob(f"deepspeed_*_{port}_{rank}"):
        buffer.unlink(missing_ok=True)
