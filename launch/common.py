"""What every entry point shares: bad input becomes one clear line and exit status 2, not a traceback;
a preempted run exits with the status the sbatch scripts requeue on; the process ends cleanly."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from data.shards import ShardError
from trainer import distributed
from trainer.config import ConfigError
from trainer.loop import NonFiniteError
from trainer.preemption import REQUEUE_EXIT_CODE, Preempted

USER_ERRORS = (ConfigError, ShardError, FileNotFoundError, ValueError)


def run_guarded(job: Callable[[], object]) -> int:
    # The rank is looked up when a message is printed: under srun, RANK is only set (from SLURM_PROCID) once the
    # job joined the process group.
    try:
        job()
    except USER_ERRORS as err:
        print(f"error (rank {distributed.launcher_rank()}): {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as err:
        print(f"error (rank {distributed.launcher_rank()}): {err}", file=sys.stderr, flush=True)
        return 1
    except Preempted as note:
        print(f"rank {distributed.launcher_rank()}: {note}", file=sys.stderr, flush=True)
        mark_preempted()
        return REQUEUE_EXIT_CODE
    return 0


def mark_preempted() -> None:
    """Creates $PREEMPTED_FILE (set by the sbatch scripts), on which they requeue: srun's exit status alone does
    not say that the run was preempted (under --kill-on-bad-exit, srun kills the ranks that exit 75 later)."""
    path = os.environ.get("PREEMPTED_FILE")
    if path:
        Path(path).touch()


def exit_process(status: int) -> None:
    """Ends an entry point: leaves the process group, flushes, and exits without the interpreter's teardown,
    where gloo's C++ threads can abort a finished run (SIGABRT seen after successful multi-rank runs)."""
    distributed.destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
