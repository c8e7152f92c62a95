"""The memory bank job: a pure function of the index, restartable shard by shard, refused when inconsistent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.shard_jobs import (
    JOB_NAME,
    claim_directory,
    is_complete,
    merge_manifest,
    owned_shards,
    shard_ranges,
    shards_to_build,
    sidecar_path,
    write_owned_shard,
)
from data.shards import MANIFEST_NAME, ShardDataset, ShardError, shard_name
from tests.conftest import ROOT, assert_ok, child_env, read_metrics, run_entry, run_here, train_args

# 11 shards of 3 (the last of 2) in batches of 2: batches are cut inside shards, and 40 DDIM steps make
# the run slow enough (~1 s on one CPU thread) to be killed between two shards.
BANK = ("bank.num_samples=32", "bank.samples_per_shard=3", "bank.batch_size=2", "bank.num_steps=40", "bank.preview=4")
NUM_SHARDS = 11


def bank_args(tiny: dict, directory: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        "tiny_cpu",
        f"model.pretrained={tiny['pretrained']}",
        f"data.bank={directory}",
        *BANK,
        *overrides,
    ]


def run_bank(tiny: dict, directory: Path, *overrides: str, num_procs: int = 1) -> subprocess.CompletedProcess:
    # One thread per process: on a loaded CPU, OpenMP threads of several processes slow each other down 50x.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return run_entry("generate_bank.py", bank_args(tiny, directory, *overrides), num_procs=num_procs)


def bank_files(directory: Path) -> dict[str, bytes]:
    """What a reader depends on: every shard, the manifest and the job record."""
    names = [shard_name(j) for j in range(NUM_SHARDS)] + [MANIFEST_NAME, JOB_NAME]
    return {name: (directory / name).read_bytes() for name in names}


def stats(directory: Path, shard_ids) -> dict[int, tuple[int, int]]:
    return {j: ((s := (directory / shard_name(j)).stat()).st_ino, s.st_mtime_ns) for j in shard_ids}


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The bank of one uninterrupted process."""
    directory = tmp_path_factory.mktemp("bank_reference") / "bank"
    proc = run_bank(tiny, directory)
    assert_ok(proc)
    assert "bank: 32 samples generated (0 already complete)" in proc.stdout
    return directory


# --- the shard-set machinery, in-process --------------------------------------------------------------
FIELDS = {"v": "cls"}


def write_all(directory: Path, num_samples: int = 7, per_shard: int = 3) -> None:
    for j, indices in enumerate(shard_ranges(num_samples, per_shard)):
        write_owned_shard(directory, j, ({"v": i} for i in indices), FIELDS, indices.start)


def test_shard_ranges_and_ownership_cover_every_index_once():
    ranges = shard_ranges(10, 4)
    assert ranges == [range(0, 4), range(4, 8), range(8, 10)]
    for world in (1, 2, 3, 5):
        owned = sorted(j for rank in range(world) for j in owned_shards(len(ranges), rank, world))
        assert owned == [0, 1, 2]
    with pytest.raises(ValueError):
        shard_ranges(0, 4)


def test_completeness_needs_sidecar_size_and_hash(tmp_path):
    write_all(tmp_path)
    assert all(is_complete(tmp_path, j, r) for j, r in enumerate(shard_ranges(7, 3)))
    assert not is_complete(tmp_path, 0, range(0, 4))  # a record of another range
    sidecar_path(tmp_path, 0).unlink()  # killed between the shard and its sidecar
    with open(tmp_path / shard_name(1), "r+b") as file:  # same size, other bytes
        file.seek(600)
        file.write(b"X")
    (tmp_path / shard_name(2)).write_bytes((tmp_path / shard_name(2)).read_bytes()[:-10])
    assert [is_complete(tmp_path, j) for j in range(3)] == [False, False, False]
    with pytest.raises(ShardError, match=r"3 shard\(s\).*shard-000000.tar, shard-000001.tar, shard-000002.tar"):
        merge_manifest(tmp_path, 7, 3, FIELDS)
    assert not (tmp_path / MANIFEST_NAME).exists()
    write_all(tmp_path)
    (tmp_path / shard_name(3)).write_bytes(b"not in this set")  # only listed shards count
    (tmp_path / f".{shard_name(0)}.77.ab.tmp").write_bytes(b"a killed writer's leftover")
    (tmp_path / f".{shard_name(1)}.json.tmp-77").write_bytes(b"{")
    sidecar_path(tmp_path, 2).unlink()
    assert shards_to_build(tmp_path, shard_ranges(7, 3), rank=0, world=2) == [2]  # rank 0 owns shards 0 and 2
    assert leftovers(tmp_path) == [f".{shard_name(1)}.json.tmp-77"]  # rank 1's, left to rank 1
    assert shards_to_build(tmp_path, shard_ranges(7, 3), rank=1, world=2) == [] and leftovers(tmp_path) == []
    write_all(tmp_path)
    merge_manifest(tmp_path, 7, 3, FIELDS, {"kind": "test"})
    assert [ShardDataset(tmp_path)[i]["v"] for i in range(7)] == list(range(7))


def test_claim_directory_refuses_other_settings_and_foreign_folders(tmp_path):
    claim_directory(tmp_path / "out", {"seed": 0, "shape": (3, 8)}, "data.bank")
    claim_directory(tmp_path / "out", {"seed": 0, "shape": [3, 8]}, "data.bank")  # the same job again
    with pytest.raises(ShardError, match=r"data.bank=.*seed: 0 -> 1.*pick a new folder"):
        claim_directory(tmp_path / "out", {"seed": 1, "shape": [3, 8]}, "data.bank")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text("{}")
    with pytest.raises(ShardError, match="no job.json"):
        claim_directory(tmp_path / "foreign", {"seed": 0}, "data.bank")


# --- the job, as users run it -------------------------------------------------------------------------
slow = pytest.mark.slow  # real processes


@slow
def test_bank_contents_and_preview(reference, tiny):
    dataset = ShardDataset(reference)
    meta = dataset.manifest.meta
    assert meta["kind"] == "bank" and meta["num_classes"] == 10
    assert meta["generator"]["num_steps"] == 40 and meta["generator"]["num_samples"] == 32
    assert meta["generator"]["pretrained"] == str(Path(tiny["pretrained"]).resolve())
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["x"].shape == (3, 8, 8) and sample["x"].dtype.name == "float32"
        assert sample["meta"] == {"index": i, "seed": 0, "class": sample["label"]}
        labels.append(sample["label"])
    assert len(set(labels)) > 3 and all(0 <= label < 10 for label in labels)
    assert (reference / "preview.png").is_file() and leftovers(reference) == []


@slow
def test_two_processes_write_the_same_bank_as_one(reference, tiny, tmp_path):
    proc = run_bank(tiny, tmp_path / "bank", num_procs=2)
    assert_ok(proc)
    assert "bank: 32 samples generated (0 already complete)" in proc.stdout and "on 2 rank(s)" in proc.stdout
    assert bank_files(tmp_path / "bank") == bank_files(reference)


@slow
def test_killed_run_resumes_where_it_stopped(reference, tiny, tmp_path):
    directory = tmp_path / "bank"
    env = child_env()
    command = [sys.executable, str(ROOT / "launch" / "generate_bank.py"), *bank_args(tiny, directory)]
    job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while job.poll() is None and not sidecar_path(directory, 0).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the run ended before it could be killed: make it slower"
    complete = [j for j in range(NUM_SHARDS) if is_complete(directory, j)]
    assert 1 <= len(complete) < NUM_SHARDS and not (directory / MANIFEST_NAME).exists()
    before = stats(directory, complete)

    proc = run_bank(tiny, directory, num_procs=2)  # resumed elastically, on another number of ranks
    assert_ok(proc)
    resumed = 32 - sum(len(r) for j, r in enumerate(shard_ranges(32, 3)) if j in complete)
    assert f"bank: {resumed} samples generated ({32 - resumed} already complete)" in proc.stdout
    assert stats(directory, complete) == before
    assert bank_files(directory) == bank_files(reference) and leftovers(directory) == []


@slow
def test_rerun_rebuilds_only_missing_or_partial_shards(reference, tiny, tmp_path):
    directory = tmp_path / "bank"
    shutil.copytree(reference, directory)
    (directory / shard_name(1)).unlink()  # missing
    with open(directory / shard_name(4), "r+b") as file:  # truncated
        file.truncate(1000)
    sidecar_path(directory, 6).unlink()  # written but never recorded
    (directory / f".{shard_name(8)}.4242.abcd1234.tmp").write_bytes(b"half a shard")  # a killed writer's file
    kept = [j for j in range(NUM_SHARDS) if j not in (1, 4, 6)]
    before = stats(directory, kept)

    proc = run_bank(tiny, directory)
    assert_ok(proc)
    assert "bank: 9 samples generated (23 already complete)" in proc.stdout
    assert stats(directory, kept) == before
    assert bank_files(directory) == bank_files(reference) and leftovers(directory) == []


@slow
def test_rerun_with_other_settings_is_refused(reference, tiny, tmp_path):
    directory = tmp_path / "bank"
    shutil.copytree(reference, directory)
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    proc = run_here("generate_bank.py", bank_args(tiny, directory, "bank.num_steps=5"))
    assert proc.returncode == 2, proc.stderr
    assert f"data.bank={directory} was written by a job with other settings (num_steps: 40 -> 5)" in proc.stderr
    assert "pick a new folder" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


@slow
def test_training_reads_the_bank(reference, tiny, tmp_path):
    proc = run_entry("train.py", train_args(tiny, tmp_path / "run", f"data.bank={reference}", "train.steps=2"))
    assert_ok(proc)
    assert all(m["loss/bank"] > 0 for m in read_metrics(tmp_path / "run"))


@slow
@pytest.mark.parametrize("damage", ["no_manifest", "truncated_shard"])
def test_training_refuses_an_inconsistent_bank(reference, tiny, tmp_path, damage):
    bank = tmp_path / "bank"
    shutil.copytree(reference, bank)
    if damage == "no_manifest":
        (bank / MANIFEST_NAME).unlink()
        named = str(bank / MANIFEST_NAME)
    else:
        with open(bank / shard_name(3), "r+b") as file:
            file.truncate(2048)
        named = str(bank / shard_name(3))
    proc = run_here("train.py", train_args(tiny, tmp_path / "run", f"data.bank={bank}"))
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert not (tmp_path / "run").exists()
