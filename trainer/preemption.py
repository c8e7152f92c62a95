"""Preemption: a signal sets a flag; ranks agree on it at the next step boundary and save together."""

from __future__ import annotations

import signal

import torch

from trainer import distributed

# The status a preempted run exits with; the sbatch scripts turn it into `scontrol requeue` (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted: saved the checkpoint of step {step}; rerun with --resume to continue")
        self.step = step


class PreemptionFlag:
    """SIGUSR1 (SLURM's pre-timeout signal, `--signal=USR1@...`) and SIGTERM request a save-and-exit."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """A collective: True on every rank as soon as one rank was signalled."""
        return distributed.any_rank(self.requested, device)
