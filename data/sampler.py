"""The global-batch planner: invariant 1 of DESIGN.md.

Global step `k` is B slots `(source, sample index, t, noise seed, null condition)` computed from
`(seed, k, slot)` alone, so the batch is the same for any number of ranks, micro-batch size and gradient
accumulation, and the data side of a run is resumed by knowing the step. Ranks only decide which slots
they compute (`slot_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGET, BANK = 0, 1
_PERMUTATION, _SLOT = 0x7065726D, 0x736C6F74  # domain tags keep the two seed streams apart


@dataclass(frozen=True)
class TimestepSplit:
    """How Diff-Tuning shares timesteps between the sources (METHOD.md, Appendix B.2)."""

    num_timesteps: int = 1000
    tau: float = 1.0
    weights: str = "complement"  # complement: psi = (t/T)^tau, xi = 1 - psi | mirrored: (t+1)^tau, (T-t)^tau'
    bank_tau: float = 1.0

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """(p_target proportional to psi, p_bank proportional to xi), each summing to 1 (or all zero)."""
        t = np.arange(self.num_timesteps, dtype=np.float64)
        if self.weights == "complement":
            psi = np.power(t / self.num_timesteps, self.tau)
            xi = 1.0 - psi
        elif self.weights == "mirrored":
            psi = np.power(t + 1.0, self.tau)
            xi = np.power(self.num_timesteps - t, self.bank_tau)
        else:
            raise ValueError(f"unknown timestep weights {self.weights!r}: use 'complement' or 'mirrored'")
        return _normalised(psi), _normalised(xi)


def _normalised(w: np.ndarray) -> np.ndarray:
    total = w.sum()
    return w / total if total > 0 else np.zeros_like(w)


def num_bank_slots(global_batch_size: int, bank_ratio: float, rounding: str = "round") -> int:
    """Paper: round(B*r); released code: int(B*r)."""
    exact = global_batch_size * bank_ratio
    return int(np.floor(exact + 0.5)) if rounding == "round" else int(np.floor(exact))


@dataclass(frozen=True)
class StepPlan:
    """The B slots of one global step; arrays of length B indexed by slot id."""

    step: int
    source: np.ndarray  # TARGET or BANK
    index: np.ndarray  # sample index within its source
    t: np.ndarray  # diffusion timestep
    noise_seed: np.ndarray  # seeds the slot's Gaussian noise
    null_condition: np.ndarray  # bank slots always, target slots when their condition is dropped
    flip: np.ndarray  # horizontal flip, used where the sample stores a flipped view (`x_flip`)

    @property
    def is_bank(self) -> np.ndarray:
        return self.source == BANK


class GlobalBatchPlanner:
    """Plans every global step; each source walks its own seeded permutation, epoch after epoch."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        num_target: int,
        num_bank: int,
        bank_ratio: float,
        split: TimestepSplit,
        label_dropout: float,
        seed: int,
        bank_rounding: str = "round",
    ):
        self.global_batch_size = global_batch_size
        self.num_bank_slots = num_bank_slots(global_batch_size, bank_ratio, bank_rounding)
        self.num_target_slots = global_batch_size - self.num_bank_slots
        self.source_sizes = {TARGET: num_target, BANK: num_bank}
        self.label_dropout = label_dropout
        self.seed = seed
        p_target, p_bank = split.probabilities()
        self._cdf = {TARGET: np.cumsum(p_target), BANK: np.cumsum(p_bank)}
        for source, slots, name in (
            (TARGET, self.num_target_slots, "target"),
            (BANK, self.num_bank_slots, "bank"),
        ):
            if slots and not self.source_sizes[source]:
                raise ValueError(f"the plan needs {slots} {name} slots per step but the {name} set is empty")
            if slots and self._cdf[source][-1] == 0:
                raise ValueError(f"the {name} timestep distribution is zero everywhere (tau={split.tau})")
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def source_sizes_by_name(self) -> dict[str, int]:
        return {"target": self.source_sizes[TARGET], "bank": self.source_sizes[BANK]}

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4:  # a step touches at most two epochs per source
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng([self.seed, _PERMUTATION, source, epoch])
            self._permutations[key] = rng.permutation(self.source_sizes[source])
        return self._permutations[key]

    def _sample_indices(self, source: int, first: int, count: int) -> np.ndarray:
        """Indices of the `count` samples that `source` serves from its `first`-th draw onwards."""
        size = self.source_sizes[source]
        draws = np.arange(first, first + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(draws // size):
            in_epoch = draws // size == epoch
            out[in_epoch] = self._permutation(source, int(epoch))[draws[in_epoch] % size]
        return out

    def plan(self, step: int) -> StepPlan:
        n_bank, n_target = self.num_bank_slots, self.num_target_slots
        # Bank slots first; `slot_ids` deals slots round-robin so each rank and micro-step gets its share.
        source = np.array([BANK] * n_bank + [TARGET] * n_target, dtype=np.int64)
        index = np.concatenate(
            [
                self._sample_indices(BANK, step * n_bank, n_bank),
                self._sample_indices(TARGET, step * n_target, n_target),
            ]
        )
        t = np.empty(self.global_batch_size, dtype=np.int64)
        noise_seed = np.empty(self.global_batch_size, dtype=np.int64)
        null_condition = source == BANK
        flip = np.empty(self.global_batch_size, dtype=bool)
        for slot in range(self.global_batch_size):
            rng = np.random.default_rng([self.seed, _SLOT, step, slot])
            t[slot] = np.searchsorted(self._cdf[source[slot]], rng.random() * self._cdf[source[slot]][-1], "right")
            noise_seed[slot] = rng.integers(2**63 - 1)
            null_condition[slot] |= rng.random() < self.label_dropout
            flip[slot] = rng.random() < 0.5
        t = np.minimum(t, len(self._cdf[TARGET]) - 1)  # guards the float edge of the last bucket
        return StepPlan(step, source, index, t, noise_seed, null_condition, flip)


def slot_ids(
    *, rank: int, micro_step: int, world_size: int, accumulation_steps: int, micro_batch_size: int
) -> np.ndarray:
    """The slots that `rank` computes at `micro_step`: slot j goes to rank j % W, micro-step (j // W) % A.

    Dealing slots round-robin spreads the leading bank slots evenly: every (rank, micro-step) pair gets
    floor or ceil of n_bank / (W * A) of them, so each rank's bank share differs by at most one.
    """
    local = np.arange(micro_batch_size)
    return (local * accumulation_steps + micro_step) * world_size + rank
