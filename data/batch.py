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
    condition: dict[str, torch.Tensor]  # the family's condition fields (DiT: label), null where `null_condition`
    null_condition: torch.Tensor
    is_bank: torch.Tensor
    ids: np.ndarray  # (slot, source, index) of each sample: what was consumed, for the sample ledger

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            x0=self.x0.to(device),
            noise=self.noise.to(device),
            t=self.t.to(device),
            condition={k: v.to(device) for k, v in self.condition.items()},
            null_condition=self.null_condition.to(device),
            is_bank=self.is_bank.to(device),
            ids=self.ids,
        )


def slot_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The slot's Gaussian noise: a function of its seed only, never of a rank's RNG stream."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def load_micro_batch(
    plan: StepPlan, slots: np.ndarray, sources: dict[int, Sequence[dict]], condition_fields: Sequence[str] = ("label",)
) -> MicroBatch:
    """Reads the samples of `slots` from their sources (`{TARGET: dataset, BANK: dataset}`) and stacks the
    clean sample (`x`, or `x_flip` where the slot flips), its noise and the condition fields."""
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
        condition={
            name: torch.from_numpy(np.stack([np.asarray(s[name]) for s in samples])) for name in condition_fields
        },
        null_condition=torch.from_numpy(plan.null_condition[slots]),
        is_bank=torch.from_numpy(plan.source[slots] == BANK),
        ids=np.stack([slots, plan.source[slots], plan.index[slots]], axis=1),
    )


class StepLoader:
    """Reads the micro-batches of step k+1 on a background thread while step k computes.

    Every step is a pure function of its number, so reading ahead changes nothing but the wait.
    """

    def __init__(
        self,
        planner,
        sources: dict[int, Sequence[dict]],
        slots_per_micro_step: list[np.ndarray],
        condition_fields: Sequence[str] = ("label",),
    ):
        self.planner, self.sources, self.slots = planner, sources, slots_per_micro_step
        self.condition_fields = tuple(condition_fields)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loader")
        self._ahead: tuple[int, Future] | None = None

    def _read(self, step: int) -> list[MicroBatch]:
        plan = self.planner.plan(step)
        return [load_micro_batch(plan, slots, self.sources, self.condition_fields) for slots in self.slots]

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
