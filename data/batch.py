"""Turns the slots of a step plan into tensors: samples read by index, noise drawn from each slot's seed."""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.forkserver
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from data.sampler import BANK, StepPlan


@dataclass
class MicroBatch:
    x0: torch.Tensor  # clean samples in the model's space (latents or pixels)
    noise: torch.Tensor
    t: torch.Tensor
    condition: dict[str, torch.Tensor]  # the family's condition fields (DiT: label), null where `null_condition`
    null_condition: torch.Tensor
    is_retention: torch.Tensor  # slots of the retention source: bank samples, or the slots KD distils on
    ids: np.ndarray  # (slot, source, index) of each sample: what was consumed, for the sample ledger

    def _map(self, move) -> MicroBatch:
        return MicroBatch(
            x0=move(self.x0),
            noise=move(self.noise),
            t=move(self.t),
            condition={k: move(v) for k, v in self.condition.items()},
            null_condition=move(self.null_condition),
            is_retention=move(self.is_retention),
            ids=self.ids,
        )

    def to(self, device: torch.device | str) -> MicroBatch:
        """Copies to `device` without waiting: from pinned memory the copy overlaps the step's compute."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=True))

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies (CUDA only), which `to` copies asynchronously; DataLoader calls this by name."""
        return self._map(lambda tensor: tensor.pin_memory())


def slot_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The slot's Gaussian noise: a function of its seed only, never of a rank's RNG stream."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def _read_slot(source, index: int, flip: bool, condition_fields: tuple[str, ...]) -> tuple[np.ndarray, list]:
    """(clean view, condition values) of one sample; a shard dataset decodes only the view the slot uses."""
    if hasattr(source, "read"):
        view = "x_flip" if flip and "x_flip" in source.fields else "x"
        sample = source.read(index, (view, *condition_fields))
    else:  # an in-memory sequence of sample dicts
        sample = source[index]
        view = "x_flip" if flip and "x_flip" in sample else "x"
    return sample[view], [sample[name] for name in condition_fields]


def load_micro_batch(
    plan: StepPlan, slots: np.ndarray, sources: dict[int, Sequence[dict]], condition_fields: Sequence[str] = ("label",)
) -> MicroBatch:
    """Reads the samples of `slots` (slot ids the plan holds) from their sources (`{TARGET: dataset, BANK: dataset}`)
    and stacks the clean sample (`x`, or `x_flip` where the slot flips), its noise and the condition fields."""
    slots = np.asarray(slots, dtype=np.int64)
    at = plan.positions(slots)
    condition_fields = tuple(condition_fields)
    read = [
        _read_slot(sources[source], index, flip, condition_fields)
        for source, index, flip in zip(plan.source[at].tolist(), plan.index[at].tolist(), plan.flip[at].tolist())
    ]
    x0 = torch.from_numpy(np.stack([view for view, _ in read]).astype(np.float32))
    noise = torch.stack([slot_noise(seed, x0.shape[1:]) for seed in plan.noise_seed[at].tolist()])
    return MicroBatch(
        x0=x0,
        noise=noise,
        t=torch.from_numpy(plan.t[at]),
        condition={
            name: torch.from_numpy(np.stack([np.asarray(values[i]) for _, values in read]))
            for i, name in enumerate(condition_fields)
        },
        null_condition=torch.from_numpy(plan.null_condition[at]),
        is_retention=torch.from_numpy(plan.source[at] == BANK),
        ids=np.stack([slots, plan.source[at], plan.index[at]], axis=1),
    )


class StepDataset(torch.utils.data.Dataset):
    """Item k is this rank's micro-batches of global step k: a pure function of k, so any process can read it."""

    def __init__(self, planner, sources, slots_per_micro_step: list[np.ndarray], condition_fields: Sequence[str]):
        self.planner, self.sources = planner, sources
        self.slots = [np.asarray(slots, dtype=np.int64) for slots in slots_per_micro_step]
        self.condition_fields = tuple(condition_fields)
        self._rank_slots = np.concatenate(self.slots) if self.slots else np.empty(0, dtype=np.int64)

    def __getitem__(self, step: int) -> list[MicroBatch]:
        plan = self.planner.plan(step, self._rank_slots)  # only this rank's slots are planned
        return [load_micro_batch(plan, slots, self.sources, self.condition_fields) for slots in self.slots]


class _StepsFrom(torch.utils.data.Sampler):
    """Steps start, start + 1, ...; `start` is set before each new iteration (a resume or a jump)."""

    def __init__(self) -> None:
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _as_is(item):
    return item


_SERVER_PRELOAD = ["data.batch"]  # what the worker server imports when it starts


def worker_context() -> multiprocessing.context.BaseContext:
    """How decoding workers start: forked from a server process started fresh, never from the rank itself, which
    by then holds its model (copied into every worker as Python touches its pages) and, on a GPU, a CUDA context
    and communication threads that a fork does not survive. Each worker re-imports the main script as under
    `spawn` (Python 3.11's forkserver cannot preload `__main__`): what the server preloaded, it finds loaded."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_SERVER_PRELOAD)
    return context


def start_worker_server(num_workers: int, preload: Sequence[str] = ()) -> None:
    """Starts the workers' server now, importing `preload` (the modules the main script imports) in the
    background, so that its start-up overlaps the rank's model build; nothing without workers."""
    if num_workers:
        _SERVER_PRELOAD.extend(name for name in preload if name not in _SERVER_PRELOAD)
        worker_context()
        _ensure_server_running()


# A scheduler's preemption warning (SLURM: USR1, then TERM) goes to every process of the job step. Only the rank
# decides what to do (save at the next step boundary: trainer/preemption.py); a helper that the signal ended
# (by default it ends a process) would fail the rank's next read instead.
HELPER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_scheduler_signals(*_) -> None:
    """In a helper process (a decoding worker: DataLoader's worker_init_fn): leaves the signals to the rank."""
    for sig in HELPER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _ensure_server_running() -> None:
    """Starts the forkserver (and multiprocessing's resource tracker, which it needs) with the signals ignored: an
    ignored signal stays ignored across exec, so both helpers ignore it from their first instruction, and so do the
    workers forked from the server. The rank's own handlers are put back at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        multiprocessing.forkserver.ensure_running()
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in HELPER_IGNORED_SIGNALS}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StepLoader:
    """Reads the micro-batches of the steps after the current one while it computes.

    With `num_workers` > 0, worker processes decode steps (each `prefetch` steps ahead, as DataLoader's
    prefetch_factor; started by `worker_context`, the planner and the shard readers pickled into them); with 0,
    a background thread reads `prefetch` steps ahead. Every step is a pure function of its number, so reading
    ahead changes nothing but the wait; `get(k)` returns step k's micro-batches even after a jump (a resume).
    An error in a worker is raised by `get`, with its message.
    """

    def __init__(
        self,
        planner,
        sources: dict[int, Sequence[dict]],
        slots_per_micro_step: list[np.ndarray],
        condition_fields: Sequence[str] = ("label",),
        *,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        if num_workers < 0 or prefetch < 1:
            raise ValueError(
                f"data.num_workers={num_workers} and data.prefetch={prefetch}: use num_workers >= 0 and prefetch >= 1"
            )
        self.dataset = StepDataset(planner, sources, slots_per_micro_step, condition_fields)
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self._next_step: int | None = None
        self._iterator = None
        self._steps = _StepsFrom()
        if num_workers:
            _ensure_server_running()  # before DataLoader's first worker would start it without the signals ignored
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=self._steps, collate_fn=_as_is, num_workers=num_workers,
                prefetch_factor=prefetch, persistent_workers=True, pin_memory=pin_memory,
                multiprocessing_context=worker_context(), worker_init_fn=ignore_scheduler_signals,
            )  # fmt: skip
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loader")
            self._ahead: dict[int, Future] = {}

    def get(self, step: int) -> list[MicroBatch]:
        """The micro-batches of `step`; the steps after it are read meanwhile."""
        if self.num_workers:
            if self._iterator is None or step != self._next_step:
                self._steps.start = step  # a new iteration from `step`; persistent workers drop stale reads
                self._iterator = iter(self._loader)
            batches = next(self._iterator)
        else:
            batches = self._threaded(step)
        self._next_step = step + 1
        return batches

    def _read(self, step: int) -> list[MicroBatch]:
        batches = self.dataset[step]
        return [batch.pin_memory() for batch in batches] if self.pin_memory else batches

    def _threaded(self, step: int) -> list[MicroBatch]:
        future = self._ahead.pop(step, None)
        batches = future.result() if future is not None else self._read(step)
        wanted = range(step + 1, step + self.prefetch + 1)
        for stale in [k for k in self._ahead if k not in wanted]:  # after a jump: reads nobody will ask for
            self._ahead.pop(stale).cancel()
        for ahead in wanted:
            if ahead not in self._ahead:
                self._ahead[ahead] = self._pool.submit(self._read, ahead)
        return batches

    def close(self) -> None:
        """Ends the workers (or the thread); the loader is unusable afterwards."""
        if self.num_workers:
            if self._iterator is not None:
                self._iterator._shutdown_workers()  # what DataLoader's own iterator does when it is collected
            self._iterator = None
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
