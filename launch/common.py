"""What every entry point shares: bad input becomes one clear line and exit status 2, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from data.shards import ShardError
from trainer.config import ConfigError

USER_ERRORS = (ConfigError, ShardError, FileNotFoundError, ValueError)


def run_guarded(job: Callable[[], object]) -> int:
    try:
        job()
    except USER_ERRORS as err:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    return 0
