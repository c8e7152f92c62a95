"""A shard set written by every rank at once: the one skeleton of the data jobs (prepare, bank, evaluation samples).

`ShardJob(...)` claims the folder (job.json: a rerun with other settings is refused before any work); `run` then
builds the shards this rank owns and has not completed, waits for every rank, and lets rank 0 merge the manifest
(and write the job's extras, e.g. a report or a preview); an error there stops every rank, not only rank 0. The
rank-free pieces (ranges, ownership, completeness, atomic writes) are `data/shard_jobs.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from data.formats import ShardFormat, shard_format
from data.shard_jobs import WDS, claim_directory, merge_manifest, shard_ranges, shards_to_build, write_owned_shard
from data.shards import ShardError
from trainer import distributed
from trainer.config import Config
from trainer.metrics import progress_bar

# samples(indices, on_batch): the samples of one shard's index range, calling on_batch(n) after each batch of n
SampleSource = Callable[[range, Callable[[int], None]], Iterable[dict]]
CRASH_EXIT_CODE = 17  # debug.crash_after_shards: the exit code of the rank that dies on purpose


@dataclass(frozen=True)
class ShardJobResult:
    num_samples: int
    num_shards: int
    num_built: int  # samples built by this run, summed over ranks (the rest were complete already)
    seconds: float  # until every rank had built its shards


class ShardJob:
    def __init__(
        self,
        directory: str | Path,
        job: dict,
        key: str,
        *,
        rank: int,
        world: int,
        device: torch.device,
        fmt: ShardFormat = WDS,
        crash_after_shards: int = -1,
        crash_rank: int = 1,
    ):
        """Claims `directory` for `job` (the settings that decide the shards' bytes); `key` names the folder's
        config key in messages. `crash_after_shards` >= 0 (debug): rank `crash_rank` exits right after it has
        written and recorded that many shards, as a preempted or failed rank would."""
        self.directory, self.key, self.fmt = Path(directory), key, fmt
        self.rank, self.world, self.device = rank, world, device
        self.crash_after_shards, self.crash_rank = crash_after_shards, crash_rank
        claim_directory(self.directory, job, key)  # every rank reads the same job.json: all fail alike

    def run(
        self,
        num_samples: int,
        samples_per_shard: int,
        fields: dict[str, str],
        samples: SampleSource,
        meta: dict,
        *,
        finish: Callable[[], None] | None = None,
        progress: str = "samples",
        unit: str = "sample",
    ) -> ShardJobResult:
        """Builds this rank's missing shards, then rank 0 merges the manifest (with `meta`) and calls `finish`.
        A collective: every rank calls it with the same arguments."""
        ranges = shard_ranges(num_samples, samples_per_shard)
        todo = shards_to_build(self.directory, ranges, self.rank, self.world, self.fmt)
        num_todo = sum(len(ranges[j]) for j in todo)
        bar = progress_bar(
            total=num_todo, desc=f"{progress} (rank 0 of {self.world})", unit=unit, disable=self.rank != 0,
            dynamic_ncols=True,
        )  # fmt: skip
        started = time.perf_counter()
        for num_written, j in enumerate(todo, start=1):
            write_owned_shard(self.directory, j, samples(ranges[j], bar.update), fields, ranges[j].start, self.fmt)
            self._crash_if_asked(num_written)
        bar.close()
        distributed.barrier()
        seconds = time.perf_counter() - started
        built = distributed.all_reduce_sum(torch.tensor([num_todo], dtype=torch.float64, device=self.device))
        error = None
        if self.rank == 0:
            try:
                merge_manifest(self.directory, num_samples, samples_per_shard, fields, meta, self.fmt)
                if finish is not None:
                    finish()
            except ShardError as err:
                error = err
        if distributed.any_rank(error is not None, self.device):  # so that no rank waits for a rank 0 that failed
            raise error or ShardError(f"rank 0 could not write the manifest of {self.directory}: see its message")
        return ShardJobResult(num_samples, len(ranges), int(built.item()), seconds)

    def _crash_if_asked(self, num_written: int) -> None:
        if num_written == self.crash_after_shards and self.rank == self.crash_rank:
            print(f"debug.crash_after_shards={num_written}: rank {self.rank} exits", flush=True)
            os._exit(CRASH_EXIT_CODE)  # no clean-up, no barrier: as a killed rank


def shard_job_settings(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    """`ShardJob`'s keyword arguments from a job's config: ranks, data.format and the debug crash point."""
    return {
        "rank": rank, "world": world, "device": device, "fmt": shard_format(cfg.data.format),
        "crash_after_shards": cfg.debug.crash_after_shards, "crash_rank": cfg.debug.crash_rank,
    }  # fmt: skip
