"""The step loader: worker processes give the same batches as none, in order after a resume; views and errors."""

import json
import multiprocessing

import numpy as np
import pytest
import torch

from data.batch import StepDataset, StepLoader, load_micro_batch
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, slot_ids
from data.shards import ShardDataset, ShardError, shard_name, write_manifest, write_shard
from tests.conftest import assert_ok, run_entry, train_args

FIELDS = {"x": "npy", "x_flip": "npy", "label": "cls"}


def write_source(directory, num_samples: int, per_shard: int, label_offset: int) -> None:
    records = []
    for shard, first in enumerate(range(0, num_samples, per_shard)):
        samples = []
        for index in range(first, min(first + per_shard, num_samples)):
            x = np.random.default_rng(index + label_offset).standard_normal((2, 3, 3)).astype(np.float32)
            samples.append({"x": x, "x_flip": x[..., ::-1], "label": label_offset + index % 3})
        records.append(write_shard(directory / shard_name(shard), samples, FIELDS, first))
    write_manifest(directory, records, FIELDS)


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_loader")
    write_source(root / "target", 13, 5, 0)
    write_source(root / "bank", 7, 4, 10)
    return root


def open_sources(root):
    return {TARGET: ShardDataset(root / "target"), BANK: ShardDataset(root / "bank")}


def make_planner(global_batch_size=8):
    return GlobalBatchPlanner(
        global_batch_size=global_batch_size, num_target=13, num_bank=7, bank_ratio=0.25,
        split=TimestepSplit(), label_dropout=0.2, seed=5,
    )  # fmt: skip


def rank_slots(rank, world_size=2, accumulation=2, micro=2):
    return [
        slot_ids(
            rank=rank, micro_step=m, world_size=world_size, accumulation_steps=accumulation, micro_batch_size=micro
        )
        for m in range(accumulation)
    ]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for name in ("x0", "noise", "t", "null_condition", "is_retention"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.condition["label"], b.condition["label"])
        np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.parametrize("num_workers,prefetch", [(0, 1), (0, 3), (2, 2)])
def test_loader_gives_each_steps_batches_after_a_resume_and_a_jump(shard_dirs, num_workers, prefetch):
    sources = open_sources(shard_dirs)
    whole = StepDataset(make_planner(), sources, [np.arange(8)], ("label",))
    loader = StepLoader(make_planner(), sources, rank_slots(1), ("label",), num_workers=num_workers, prefetch=prefetch)
    try:
        for step in [4, 5, 6, 7, 2, 3]:  # a resume at step 4, then a jump back
            batches = loader.get(step)
            plan = make_planner().plan(step)
            expected = [load_micro_batch(plan, slots, sources, ("label",)) for slots in rank_slots(1)]
            assert_same_batches(batches, expected)
            for batch, slots in zip(batches, rank_slots(1), strict=True):  # a rank's slots of the whole batch
                assert torch.equal(batch.x0, whole[step][0].x0[slots])
    finally:
        loader.close()


def test_workers_end_when_the_loader_closes(shard_dirs):
    before = set(multiprocessing.active_children())
    loader = StepLoader(make_planner(), open_sources(shard_dirs), rank_slots(0), ("label",), num_workers=2)
    loader.get(0)
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    assert set(multiprocessing.active_children()) - before == set()


class RecordingSource:
    """A shard dataset that notes which fields each read asks for."""

    def __init__(self, dataset):
        self.dataset, self.fields, self.asked = dataset, dataset.fields, []

    def read(self, index, fields):
        self.asked.append((index, tuple(fields)))
        return self.dataset.read(index, fields)


def test_only_the_view_a_slot_uses_is_read(shard_dirs):
    sources = {source: RecordingSource(dataset) for source, dataset in open_sources(shard_dirs).items()}
    plan = make_planner().plan(3)
    batch = load_micro_batch(plan, np.arange(8), sources, ("label",))
    asked = {source: iter(recording.asked) for source, recording in sources.items()}
    for slot in range(8):
        index, fields = next(asked[plan.source[slot]])
        assert index == plan.index[slot]
        assert fields == ("x_flip" if plan.flip[slot] else "x", "label")
        sample = open_sources(shard_dirs)[plan.source[slot]][index]
        assert np.array_equal(batch.x0[slot].numpy(), sample["x_flip" if plan.flip[slot] else "x"])
    assert 0 < plan.flip.sum() < 8  # both views were asked for


def test_an_error_in_a_worker_names_the_shard(shard_dirs, tmp_path):
    import shutil

    shutil.copytree(shard_dirs / "target", tmp_path / "target")
    shutil.copytree(shard_dirs / "bank", tmp_path / "bank")
    sources = open_sources(tmp_path)
    shard = tmp_path / "target" / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:2000])  # cut under the running loader, after its start-up checks
    # A global batch of 20 uses every sample at step 0, those of the cut shard included.
    planner = GlobalBatchPlanner(
        global_batch_size=20, num_target=13, num_bank=7, bank_ratio=0.35,
        split=TimestepSplit(), label_dropout=0.0, seed=5,
    )  # fmt: skip
    loader = StepLoader(planner, sources, [np.arange(20)], ("label",), num_workers=2)
    try:
        with pytest.raises(ShardError, match=r"shard-000001\.tar is truncated"):
            loader.get(0)
    finally:
        loader.close()


def test_bad_loader_settings_name_the_keys(shard_dirs):
    with pytest.raises(ValueError, match="data.num_workers=-1 and data.prefetch=2"):
        StepLoader(make_planner(), open_sources(shard_dirs), rank_slots(0), num_workers=-1)
    with pytest.raises(ValueError, match="prefetch >= 1"):
        StepLoader(make_planner(), open_sources(shard_dirs), rank_slots(0), prefetch=0)


@pytest.mark.slow
def test_two_ranks_with_worker_processes_consume_the_plan_across_a_resume(tiny, tmp_path):
    """Every (step, slot) of the global plan is consumed once, by workers, also after a resume in the middle."""
    run = tmp_path / "run"
    args = train_args(tiny, run, "data.num_workers=2", "data.prefetch=3", "debug.sample_ledger=true")
    assert_ok(run_entry("train.py", [*args, "train.steps=4", "run.export=false"], num_procs=2))
    assert_ok(run_entry("train.py", [*args, "train.steps=6", "--resume"], num_procs=2))
    rows = [json.loads(line) for path in (run / "ledger").glob("rank*.jsonl") for line in path.read_text().splitlines()]
    consumed = sorted((row["step"], row["slot"], row["source"], row["index"]) for row in rows)
    sizes = {source: len(ShardDataset(tiny[name])) for source, name in ((TARGET, "target"), (BANK, "bank"))}
    planner = GlobalBatchPlanner(
        global_batch_size=8, num_target=sizes[TARGET], num_bank=sizes[BANK], bank_ratio=0.5,
        split=TimestepSplit(), label_dropout=0.1, seed=0,
    )  # fmt: skip
    planned = sorted(
        (step, slot, source, index)
        for step in range(6)
        for slot, source, index in zip(*(getattr(planner.plan(step), f).tolist() for f in ("slots", "source", "index")))
    )
    assert consumed == planned
