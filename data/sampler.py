"""The global-batch planner: invariant 1 of DESIGN.md.

Global step `k` is B slots `(source, sample index, t, noise seed, null condition)` computed from
`(seed, k, slot)` alone, so the batch is the same for any number of ranks, micro-batch size and gradient
accumulation, and the data side of a run is resumed by knowing the step. Ranks only decide which slots
they compute (`slot_ids`) and plan only those: a slot's draws are a counter-based hash (splitmix64) of
`(seed, step, slot, draw)`, computed for many slots at once, so planning costs microseconds per slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np

TARGET, BANK = 0, 1
_PERMUTATION, _SLOT = 0x7065726D, 0x736C6F74  # domain tags keep the two seed streams apart
# A slot's draws, in the order of its splitmix64 stream: the timestep, the label dropout, the flip, the noise seed.
_T, _DROPOUT, _FLIP, _NOISE = range(4)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
_UINT64 = 1 << 64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs pass as independent uniform bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*words: int) -> np.ndarray:
    """One uint64 (as a 1-element array) that hashes the words in order: a counter-based seed."""
    key = np.zeros(1, dtype=np.uint64)
    for word in words:
        key = _mix(key + _GOLDEN_GAMMA + np.uint64(int(word) % _UINT64))
    return key


def slot_draws(seed: int, step: int, slots: np.ndarray, num_draws: int) -> np.ndarray:
    """(len(slots), num_draws) uint64: draw d of slot s is output d of a splitmix64 stream keyed by (seed, step, s).

    Counter-based: any slot's draws are computed alone, vectorised, without a generator per slot.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        slot_keys = _mix(_key(seed, _SLOT, step) + np.asarray(slots, dtype=np.uint64) * _GOLDEN_GAMMA)
        counters = np.arange(1, num_draws + 1, dtype=np.uint64) * _GOLDEN_GAMMA
        return _mix(slot_keys[:, None] + counters[None, :])


def uniform(bits: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from the top 53 bits of uint64 draws."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@runtime_checkable
class NoiseLevels(Protocol):
    """How Diff-Tuning shares a noise process's levels between the sources: target slots draw levels with
    density proportional to p(level) psi(level), bank slots to p(level) xi(level), where p is the process's own
    training distribution. The planner gives each slot a uniform draw; the process's split maps it (host side,
    numpy: the plan reads nothing from a device)."""

    def total_weight(self, bank: bool) -> float:
        """The mass of the source's weighting (0: it is zero everywhere, so the source cannot be drawn)."""

    def levels(self, u: np.ndarray, bank: bool) -> np.ndarray:
        """The noise levels of slots with uniform draws `u` in [0, 1), for bank or target slots."""


@dataclass(frozen=True)
class TimestepSplit:
    """How Diff-Tuning shares the discrete timesteps of a DDPM process between the sources (METHOD.md,
    Appendix B.2): a `NoiseLevels` over t = 0..T-1, whose training distribution is uniform.

    complement (the paper): psi = (t/T)^tau, xi = 1 - psi. mirrored (the released code): (t+1)^tau and
    (T-t)^tau'. logsnr (ours, not the paper's): psi = sigmoid((center - logSNR(t)) / width), a rise toward noise
    placed in log-SNR, where the schedule decides what a level shows, instead of in t; xi = 1 - psi.
    `bank_max_t` (ours): no bank draws above it (xi = 0 there), so the bank does not train the noisiest steps."""

    num_timesteps: int = 1000
    tau: float = 1.0
    weights: str = "complement"  # complement | mirrored | logsnr
    bank_tau: float = 1.0
    log_snr: tuple[float, ...] = ()  # logSNR(t) of the schedule, t = 0..T-1: what logsnr weights are placed on
    logsnr_center: float = -2.5
    logsnr_width: float = 1.0
    bank_max_t: int | None = None

    def weights_of_t(self) -> tuple[np.ndarray, np.ndarray]:
        """(psi, xi) at t = 0..T-1, unnormalised."""
        t = np.arange(self.num_timesteps, dtype=np.float64)
        if self.weights == "complement":
            psi = np.power(t / self.num_timesteps, self.tau)
            xi = 1.0 - psi
        elif self.weights == "mirrored":
            psi = np.power(t + 1.0, self.tau)
            xi = np.power(self.num_timesteps - t, self.bank_tau)
        elif self.weights == "logsnr":
            if len(self.log_snr) != self.num_timesteps:
                raise ValueError("logsnr timestep weights need the schedule's log-SNR at every timestep")
            psi = 1.0 / (1.0 + np.exp((np.asarray(self.log_snr) - self.logsnr_center) / self.logsnr_width))
            xi = 1.0 - psi
        else:
            raise ValueError(f"unknown timestep weights {self.weights!r}: use 'complement', 'mirrored' or 'logsnr'")
        if self.bank_max_t is not None:
            xi = np.where(t > self.bank_max_t, 0.0, xi)
        return psi, xi

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """(p_target proportional to psi, p_bank proportional to xi), each summing to 1 (or all zero)."""
        psi, xi = self.weights_of_t()
        return _normalised(psi), _normalised(xi)

    def mean_weights(self) -> tuple[float, float]:
        """(E[psi], E[xi]) under the uniform training distribution of t: with complement weights and tau = 1 both
        are 1/2, the paper's bank share; E[xi] is the bank share that keeps the bank's slots in step with xi."""
        psi, xi = self.weights_of_t()
        return float(psi.mean()), float(xi.mean())

    @cached_property
    def _cdfs(self) -> tuple[np.ndarray, np.ndarray]:
        p_target, p_bank = self.probabilities()
        return np.cumsum(p_target), np.cumsum(p_bank)

    def total_weight(self, bank: bool) -> float:
        return float(self._cdfs[bank][-1])

    def levels(self, u: np.ndarray, bank: bool) -> np.ndarray:
        """Inverse-CDF sampling of the integer timestep (int64)."""
        cdf = self._cdfs[bank]
        t = np.searchsorted(cdf, u * cdf[-1], "right")
        return np.minimum(t, len(cdf) - 1)  # guards the float edge of the last bucket


def _normalised(w: np.ndarray) -> np.ndarray:
    total = w.sum()
    return w / total if total > 0 else np.zeros_like(w)


BANK_LEVELS = ("xi", "target")  # method.bank_levels


def num_bank_slots(global_batch_size: int, bank_ratio: float, rounding: str = "round") -> int:
    """Paper: round(B*r); released code: int(B*r)."""
    exact = global_batch_size * bank_ratio
    return int(np.floor(exact + 0.5)) if rounding == "round" else int(np.floor(exact))


@dataclass(frozen=True)
class StepPlan:
    """Slots of one global step: all B of them, or those a rank asked for; arrays indexed like `slots`."""

    step: int
    slots: np.ndarray  # slot ids of the entries (0..B-1 for a whole plan)
    source: np.ndarray  # TARGET or BANK
    index: np.ndarray  # sample index within its source
    t: np.ndarray  # noise level: the diffusion timestep (int64), or sigma (float64) of a continuous process
    noise_seed: np.ndarray  # seeds the slot's Gaussian noise
    null_condition: np.ndarray  # bank slots (but under prior preservation), target slots when their condition drops
    flip: np.ndarray  # horizontal flip, used where the sample stores a flipped view (`x_flip`)

    @property
    def is_bank(self) -> np.ndarray:
        return self.source == BANK

    def positions(self, slots: np.ndarray) -> np.ndarray:
        """Where slot ids `slots` sit in this plan's arrays; KeyError for a slot it does not hold."""
        slots = np.asarray(slots, dtype=np.int64)
        order = np.argsort(self.slots, kind="stable")
        held = self.slots[order]
        where = np.searchsorted(held, slots)
        found = where < len(held)
        found[found] = held[where[found]] == slots[found]
        if not found.all():
            raise KeyError(f"step {self.step}'s plan holds no slots {slots[~found][:5].tolist()}; plan them first")
        return order[where]


class GlobalBatchPlanner:
    """Plans every global step; each source walks its own seeded permutation, epoch after epoch."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        num_target: int,
        num_bank: int,
        bank_ratio: float,
        split: NoiseLevels,
        label_dropout: float,
        seed: int,
        bank_rounding: str = "round",
        retention_name: str = "bank",
        bank_null_condition: bool = True,
        bank_levels: str = "xi",
    ):
        """`num_bank`, `bank_ratio`: the size of the data set the retention slots read and their share of the batch;
        `retention_name` names them (`bank`, or `kd` whose slots re-read the target set with their own permutation).
        Diff-Tuning's bank slots take the null condition and levels ~ p xi (the defaults); DreamBooth's prior
        preservation keeps each bank sample's own condition (`bank_null_condition=False`) and draws its levels as
        the target slots do (`bank_levels="target"`)."""
        if bank_levels not in BANK_LEVELS:
            raise ValueError(f"bank_levels={bank_levels!r} is not one of {BANK_LEVELS}")
        self.bank_null_condition, self.bank_levels_as_target = bank_null_condition, bank_levels == "target"
        self.global_batch_size = global_batch_size
        self.retention_name = retention_name
        self.num_bank_slots = num_bank_slots(global_batch_size, bank_ratio, bank_rounding)
        self.num_target_slots = global_batch_size - self.num_bank_slots
        self.source_sizes = {TARGET: num_target, BANK: num_bank}
        self.label_dropout = label_dropout
        self.seed = seed
        self.split = split
        for source, slots, name in (
            (TARGET, self.num_target_slots, "target"),
            (BANK, self.num_bank_slots, retention_name),
        ):
            if slots and not self.source_sizes[source]:
                raise ValueError(f"the plan needs {slots} {name} slots per step but the {name} set is empty")
            if slots and split.total_weight(source == BANK and not self.bank_levels_as_target) == 0:
                raise ValueError(f"the {name} timestep distribution is zero everywhere ({split})")
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def source_sizes_by_name(self) -> dict[str, int]:
        return {"target": self.source_sizes[TARGET], self.retention_name: self.source_sizes[BANK]}

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4:  # a step touches at most two epochs per source
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng([self.seed, _PERMUTATION, source, epoch])
            self._permutations[key] = rng.permutation(self.source_sizes[source])
        return self._permutations[key]

    def _sample_indices(self, source: int, draws: np.ndarray) -> np.ndarray:
        """The samples that `source` serves at its draws number `draws` (draw n: epoch n // size, place n % size)."""
        size = self.source_sizes[source]
        epochs, places = np.divmod(draws, size)
        out = np.empty(len(draws), dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            out[in_epoch] = self._permutation(source, int(epoch))[places[in_epoch]]
        return out

    def plan(self, step: int, slots: np.ndarray | None = None) -> StepPlan:
        """Step `step`'s slots `slots` (all B when None); equal to the whole plan indexed by `slots`."""
        n_bank, n_target = self.num_bank_slots, self.num_target_slots
        if slots is None:
            slots = np.arange(self.global_batch_size, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.global_batch_size):
            raise IndexError(f"slot ids must lie in 0..{self.global_batch_size - 1}, got {slots.min()}..{slots.max()}")
        # Bank slots first; `slot_ids` deals slots round-robin so each rank and micro-step gets its share.
        is_bank = slots < n_bank
        source = np.where(is_bank, BANK, TARGET).astype(np.int64)
        index = np.empty(len(slots), dtype=np.int64)
        index[is_bank] = self._sample_indices(BANK, step * n_bank + slots[is_bank])
        index[~is_bank] = self._sample_indices(TARGET, step * n_target + slots[~is_bank] - n_bank)
        draws = slot_draws(self.seed, step, slots, 4)
        u = uniform(draws[:, _T])
        bank_levels = self.split.levels(u[is_bank], not self.bank_levels_as_target)
        target_levels = self.split.levels(u[~is_bank], False)
        t = np.empty(len(slots), dtype=np.result_type(bank_levels, target_levels))  # int64 t, or float64 sigma
        t[is_bank], t[~is_bank] = bank_levels, target_levels
        # Target slots drop their condition at the dropout rate; bank slots never (they keep it, or never have it).
        null_condition = np.where(is_bank, self.bank_null_condition, uniform(draws[:, _DROPOUT]) < self.label_dropout)
        flip = uniform(draws[:, _FLIP]) < 0.5
        noise_seed = (draws[:, _NOISE] >> np.uint64(1)).astype(np.int64)  # 63 bits: a non-negative torch seed
        return StepPlan(step, slots, source, index, t, noise_seed, null_condition, flip)


def plan_seconds(
    global_batch_size: int, repeats: int = 20, num_target: int = 1_281_167, num_bank: int = 1_000_000
) -> float:
    """Median seconds of one whole-batch plan (ImageNet-sized sources by default): the benchmark's figure."""
    planner = GlobalBatchPlanner(
        global_batch_size=global_batch_size, num_target=num_target, num_bank=num_bank, bank_ratio=0.5,
        split=TimestepSplit(), label_dropout=0.1, seed=0,
    )  # fmt: skip
    planner.plan(0)  # builds the first epoch's permutations, which later steps reuse
    seconds = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        planner.plan(step)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def slot_ids(
    *, rank: int, micro_step: int, world_size: int, accumulation_steps: int, micro_batch_size: int
) -> np.ndarray:
    """The slots that `rank` computes at `micro_step`: slot j goes to rank j % W, micro-step (j // W) % A.

    Dealing slots round-robin spreads the leading bank slots evenly: every (rank, micro-step) pair gets
    floor or ceil of n_bank / (W * A) of them, so each rank's bank share differs by at most one.
    """
    local = np.arange(micro_batch_size)
    return (local * accumulation_steps + micro_step) * world_size + rank


if __name__ == "__main__":
    for batch in (256, 1024, 4096):
        print(f"plan of global batch {batch}: {plan_seconds(batch) * 1e3:.3f} ms (median of 20 steps)")
