"""Counting host reads: every time a tensor's value is read back into Python (`.item()`, `bool(t)`,
`float(t)`, `.tolist()`, boolean-mask indexing, a data-dependent shape) torch runs
`aten._local_scalar_dense`; on a GPU each one waits for the device to finish (DESIGN invariant 6). A device
synchronisation through DeepSpeed's accelerator (its timers do one per forward and step) waits the same way
and is counted too, as origin "device_sync".

`debug.count_host_reads=true` wraps every training step in `HostReadCounter` and writes one line per
step to `run.dir/host_reads/rank_XXXXX.jsonl`. Each read is attributed to the innermost Python frame outside
torch: the project's own code, DeepSpeed, or torch's optimizer (a non-fused optimizer reads its own host-side
`step` counters, CPU tensors that cost no sync on a GPU; the project's fused AdamW makes none).
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from torch.utils._python_dispatch import TorchDispatchMode

PROJECT_DIRS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("trainer", "data", "models"))
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
TORCH_OPTIM_DIR = str(Path(torch.__file__).resolve().parent / "optim")


def read_origin(frame=None) -> tuple[str, str]:
    """(origin, file:line) of who asked for the value: the innermost frame outside torch ('project',
    'deepspeed', 'other'), or 'torch_optimizer' when torch's optimizer code read it (its own step
    counters), or 'torch'."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        site = f"{path.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno}"
        if path.startswith(TORCH_OPTIM_DIR):
            return "torch_optimizer", site
        if path.startswith(PROJECT_DIRS):
            return "project", site
        if "/deepspeed/" in path:
            return "deepspeed", site
        if not path.startswith(TORCH_DIR) and path != __file__:
            return "other", site
        frame = frame.f_back
    return "torch", "torch"


_HOST_SIDE: weakref.WeakSet = weakref.WeakSet()
# A value to Python, and ops whose output size depends on the data (boolean-mask indexing): both wait for
# the device on a GPU.
READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
)


def host_side(tensor: torch.Tensor) -> torch.Tensor:
    """Marks a tensor that lives in host memory by design, also on a GPU machine (e.g. a flag reduced over
    gloo): reading it needs no device sync, so the counter lists it apart, not in the total."""
    _HOST_SIDE.add(tensor)
    return tensor


def _has_mask(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostReadCounter(TorchDispatchMode):
    """Counts host reads by origin while active: `aten._local_scalar_dense`, data-dependent sizes (`nonzero`,
    `masked_select`), and `Tensor.tolist` and
    `Tensor.numpy`, which on the CPU read memory without dispatching (on a GPU they copy to the host)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.sites: dict[str, int] = {}
        self._originals: dict[str, object] = {}

    def _count(self, tensor, frame, origin: str | None = None) -> None:
        if tensor is not None and tensor in _HOST_SIDE:
            origin, site = "host_side", ""
        else:
            found, site = read_origin(frame)
            origin = origin or found
        self.counts[origin] = self.counts.get(origin, 0) + 1
        if site:
            self.sites[site] = self.sites.get(site, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS or (func is torch.ops.aten.index.Tensor and _has_mask(args[1])):
            self._count(args[0], sys._getframe(1))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = self._originals[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self._count(tensor, sys._getframe(1))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        # A device synchronisation makes the host wait as a read does, with no tensor to dispatch: DeepSpeed's
        # (its timers, say) go through the accelerator, whose call is counted as origin "device_sync".
        accelerator, synchronize = get_accelerator(), get_accelerator().synchronize

        def counted_sync(*args, **kwargs):
            self._count(None, sys._getframe(1), origin="device_sync")
            return synchronize(*args, **kwargs)

        accelerator.synchronize = counted_sync
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        vars(get_accelerator()).pop("synchronize", None)  # the class's method again
        return super().__exit__(*exc)

    def take(self) -> tuple[dict[str, int], dict[str, int]]:
        """(counts by origin, counts by file:line) since the last call."""
        counts, sites, self.counts, self.sites = self.counts, self.sites, {}, {}
        return counts, sites


class HostReadLog:
    """One counter around each step; one JSON line per step and rank."""

    def __init__(self, run_dir: Path, rank: int):
        (Path(run_dir) / "host_reads").mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "host_reads" / f"rank_{rank:05d}.jsonl", "a")
        self.counter = HostReadCounter()

    def __enter__(self) -> HostReadLog:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)

    def write(self, step: int, logged: bool, saved: bool) -> None:
        counts, sites = self.counter.take()
        total = sum(n for origin, n in counts.items() if origin != "host_side")
        line = {"step": step, "logged": logged, "saved": saved, "total": total, "by_origin": counts, "by_site": sites}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
