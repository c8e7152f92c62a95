"""Turns the slots of a step plan into tensors: samples read by index, noise drawn from each slot's seed."""

from __future__ import annotations

from collections.abc import Sequence
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
    label: torch.Tensor  # the source's label; replace by the null condition where `null_condition`
    null_condition: torch.Tensor
    is_bank: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MicroBatch:
        floats = {k: getattr(self, k).to(device, dtype) for k in ("x0", "noise")}
        ints = {k: getattr(self, k).to(device) for k in ("t", "label", "null_condition", "is_bank")}
        return MicroBatch(**floats, **ints)


def slot_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The slot's Gaussian noise: a function of its seed only, never of a rank's RNG stream."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def load_micro_batch(plan: StepPlan, slots: np.ndarray, sources: dict[int, Sequence[dict]]) -> MicroBatch:
    """Reads the samples of `slots` from their sources (`{TARGET: dataset, BANK: dataset}`)."""
    samples = [sources[plan.source[s]][plan.index[s]] for s in slots]
    views = [
        sample["x_flip"] if flip and "x_flip" in sample else sample["x"]
        for sample, flip in zip(samples, plan.flip[slots])
    ]
    x0 = torch.from_numpy(np.stack(views).astype(np.float32))
    noise = torch.stack([slot_noise(plan.noise_seed[s], x0.shape[1:]) for s in slots])
    return MicroBatch(
        x0=x0,
        noise=noise,
        t=torch.from_numpy(plan.t[slots]),
        label=torch.tensor([int(s.get("label", 0)) for s in samples], dtype=torch.long),
        null_condition=torch.from_numpy(plan.null_condition[slots]),
        is_bank=torch.from_numpy(plan.source[slots] == BANK),
    )


class StepLoader:
    """Reads the micro-batches of step k+1 on a background thread while step k computes.

    Every step is a pure function of its number, so reading ahead changes nothing but the wait.
    """

    def __init__(self, planner, sources: dict[int, Sequence[dict]], slots_per_micro_step: list[np.ndarray]):
        self.planner, self.sources, self.slots = planner, sources, slots_per_micro_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loader")
        self._ahead: tuple[int, Future] | None = None

    def _read(self, step: int) -> list[MicroBatch]:
        plan = self.planner.plan(step)
        return [load_micro_batch(plan, slots, self.sources) for slots in self.slots]

    def get(self, step: int) -> list[MicroBatch]:
        """The micro-batches of `step`, then starts reading `step + 1`."""
        if self._ahead is not None and self._ahead[0] == step:
            batches = self._ahead[1].result()
        else:
            batches = self._read(step)
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
