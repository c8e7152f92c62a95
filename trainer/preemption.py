"""Preemption: a signal sets a flag; ranks agree on it at a step boundary and save together.

The agreement never stalls a step: at every boundary each rank starts summing its flag over the ranks
on the CPU (gloo, asynchronously) and reads the sum started one boundary earlier, long finished by then.
Every rank so learns of a signal at the same boundary, one step after it arrived.
"""

from __future__ import annotations

import signal

import torch

from trainer import distributed
from trainer.host_reads import host_side

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
        self._pending: tuple[torch.Tensor, object] | None = None
        # Restored by close(): a process that trains several times (continual stages) is not left with a dead flag.
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """A collective, at every step boundary on every rank: True on every rank at the same boundary."""
        agreed = False
        if self._pending is not None:
            flags, work = self._pending
            work.wait()
            agreed = bool(flags.item() > 0)  # a CPU tensor: reading it waits for no device
        flags = host_side(torch.tensor([float(self.requested)]))
        self._pending = (flags, distributed.start_host_sum(flags))
        return agreed

    def close(self) -> None:
        """Waits for the sum in flight, so that no rank leaves a collective behind."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
