"""Diff-Tuning on a continuous noise level: psi(level) = CDF(level)^tau, with CDF the process's own training
distribution of the level (tau = 1: the paper's psi = CDF, as for EDM), and xi = 1 - psi.

A target slot draws its level with density p(level) psi(level), a bank slot with p(level) xi(level). In the variable
v = CDF(level), uniform under p, those densities are (tau + 1) v^tau and (1 - v^tau) (tau + 1) / tau: their inverse
CDFs turn a slot's uniform draw into v, and the distribution's quantile turns v into the level. EDM's sigma and flow
matching's time share this; each process brings only its `LevelDistribution`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

EDGE = 2.0**-53  # keeps v inside (0, 1), where quantiles of unbounded distributions are finite
_BISECTION_STEPS = 60  # halves [0, 1] down to float64 resolution


class LevelDistribution(Protocol):
    """A process's training distribution of its continuous level (float64, numpy: the plan is host work)."""

    def cdf(self, level: np.ndarray) -> np.ndarray: ...

    def quantile(self, v: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class CDFSplit:
    """`NoiseLevels` of a continuous process: psi = CDF(level)^tau for target slots, xi = 1 - psi for bank slots."""

    distribution: LevelDistribution
    tau: float

    def cdf(self, level: np.ndarray) -> np.ndarray:
        return self.distribution.cdf(np.asarray(level, dtype=np.float64))

    def psi(self, level: np.ndarray) -> np.ndarray:
        return self.cdf(level) ** self.tau

    def xi(self, level: np.ndarray) -> np.ndarray:
        return 1.0 - self.psi(level)

    def total_weight(self, bank: bool) -> float:
        """Integral of psi (or xi) over the training distribution: 1 / (tau + 1) (or tau / (tau + 1))."""
        return self.tau / (self.tau + 1.0) if bank else 1.0 / (self.tau + 1.0)

    def quantiles(self, u: np.ndarray, bank: bool) -> np.ndarray:
        """v = CDF(level) of slots with uniform draws `u`, under the source's density in v."""
        u = np.asarray(u, dtype=np.float64)
        if not bank:
            return u ** (1.0 / (self.tau + 1.0))  # inverse of the CDF v^(tau + 1)
        # The bank's CDF in v, ((tau + 1) v - v^(tau + 1)) / tau, is increasing on [0, 1]: invert by bisection.
        low, high = np.zeros_like(u), np.ones_like(u)
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            below = ((self.tau + 1.0) * middle - middle ** (self.tau + 1.0)) / self.tau < u
            low, high = np.where(below, middle, low), np.where(below, high, middle)
        return (low + high) / 2

    def levels(self, u: np.ndarray, bank: bool) -> np.ndarray:
        return self.distribution.quantile(np.clip(self.quantiles(u, bank), EDGE, 1.0 - EDGE))  # float64
