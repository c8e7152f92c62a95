"""MDS shard sets: the same samples, checks and global batches as the webdataset tar shards of data/shards.py."""

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from data.batch import load_micro_batch
from data.formats import open_shard_set
from data.mds import (
    INDEX_NAME,
    MDSDataset,
    _streaming,
    check_mds_shard,
    hash_mds_shard,
    mds_shard_name,
    write_mds_manifest,
    write_mds_shard,
)
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, slot_ids
from data.shards import MANIFEST_NAME, ShardDataset, ShardError, ShardRecord, shard_name, write_manifest, write_shard

FIELDS = {"x": "npy", "x_flip": "npy", "label": "cls", "caption": "txt", "meta": "json", "img": "png"}
SIZES = (3, 4, 2)  # shards hold indices 0-2, 3-6, 7-8


def make_sample(index: int, num_classes: int = 7) -> dict:
    rng = np.random.default_rng(index)
    x = rng.standard_normal((3, 4, 4)).astype(np.float16 if index % 2 else np.float32)
    image = rng.integers(0, 256, (5, 6, 3) if index % 3 else (5, 6), dtype=np.uint8)  # RGB and grayscale
    return {
        "x": x,
        "x_flip": x[..., ::-1],  # not contiguous: the writer must store it as C order
        "label": index % num_classes,
        "caption": f"sample {index} — é",
        "meta": {"z": index, "a": [1.5, None, "b"]},
        "img": image,
    }


def write_both(directory, num_samples: int, per_shard: int, fields=FIELDS, num_classes: int = 7, **kw):
    """The same samples as a webdataset set (`directory/tar`) and an MDS set (`directory/mds`)."""
    records = {"tar": [], "mds": []}
    for shard, first in enumerate(range(0, num_samples, per_shard)):
        samples = [make_sample(i, num_classes) for i in range(first, min(first + per_shard, num_samples))]
        samples = [{name: s[name] for name in fields} for s in samples]
        records["tar"].append(write_shard(directory / "tar" / shard_name(shard), samples, fields, first))
        records["mds"].append(write_mds_shard(directory / "mds" / mds_shard_name(shard), samples, fields, first, **kw))
    write_manifest(directory / "tar", records["tar"], fields, {"classes": ["cat", "dog"]})
    write_mds_manifest(directory / "mds", records["mds"], fields, {"classes": ["cat", "dog"]})
    return records["mds"]


def write_set(directory, sizes=SIZES, fields=FIELDS, **kw) -> list[ShardRecord]:
    records, first = [], 0
    for shard, size in enumerate(sizes):
        samples = (make_sample(i) for i in range(first, first + size))
        records.append(write_mds_shard(directory / mds_shard_name(shard), samples, fields, first, **kw))
        first += size
    write_mds_manifest(directory, records, fields, {"classes": ["cat", "dog"]})
    return records


def assert_same_sample(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert type(got[name]) is type(value), name
        if isinstance(value, np.ndarray):
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            np.testing.assert_array_equal(got[name], value)
            assert got[name].flags.writeable or FIELDS[name] == "png", name  # as ShardDataset's arrays
        else:
            assert got[name] == value, name


def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]


def test_round_trip_across_shards_and_mds_files(tmp_path):
    records = write_set(tmp_path / "one")
    multi = write_set(tmp_path / "multi", size_limit_bytes=700)  # forces several MDS files per shard
    assert len(list((tmp_path / "multi" / records[1].name).glob("shard.*.mds"))) > 1
    assert [r.first_index for r in records] == [0, 3, 7] and [r.num_samples for r in records] == [3, 4, 2]
    for dataset in (MDSDataset(tmp_path / "one"), MDSDataset(tmp_path / "multi")):
        assert len(dataset) == 9 == dataset.manifest.num_samples and dataset.manifest.fields == FIELDS
        assert dataset.manifest.meta == {"classes": ["cat", "dog"], "format": "mds"}
        for index in [8, 0, 2, 3, 6, 7, 4, 5, 1]:  # out of order, on both sides of each shard boundary
            expected = make_sample(index)
            assert_same_sample(dataset[index], {**expected, "x_flip": expected["x_flip"].copy(), "__index__": index})
        assert dataset[np.int64(5)]["__index__"] == 5
        for bad_index in (-1, 9):
            with pytest.raises(IndexError, match="out of range"):
                dataset[bad_index]
    assert [r.num_samples for r in multi] == [3, 4, 2]


def test_same_samples_as_webdataset(tmp_path):
    write_both(tmp_path, 11, 4)
    tar, mds = ShardDataset(tmp_path / "tar"), MDSDataset(tmp_path / "mds")
    assert len(tar) == len(mds) == 11
    for index in range(11):
        assert_same_sample(mds[index], tar[index])


def test_same_global_batches_as_webdataset(tmp_path):
    fields = {"x": "npy", "x_flip": "npy", "label": "cls"}
    write_both(tmp_path / "target", 23, 5, fields, num_classes=4)
    write_both(tmp_path / "bank", 17, 6, fields, num_classes=10)
    sources = {
        backend: {TARGET: dataset(tmp_path / "target" / backend), BANK: dataset(tmp_path / "bank" / backend)}
        for backend, dataset in (("tar", ShardDataset), ("mds", MDSDataset))
    }
    planner = GlobalBatchPlanner(
        global_batch_size=8, num_target=23, num_bank=17, bank_ratio=0.25,
        split=TimestepSplit(), label_dropout=0.2, seed=3,
    )  # fmt: skip
    for step in range(6):  # several epochs of both sources
        plan = planner.plan(step)
        for rank in range(2):
            slots = slot_ids(rank=rank, micro_step=0, world_size=2, accumulation_steps=1, micro_batch_size=4)
            tar, mds = (load_micro_batch(plan, slots, sources[backend]) for backend in ("tar", "mds"))
            for name in ("x0", "noise", "t", "null_condition", "is_retention"):
                assert torch.equal(getattr(tar, name), getattr(mds, name)), name
            assert tar.condition.keys() == mds.condition.keys() == {"label"}
            assert torch.equal(tar.condition["label"], mds.condition["label"])
            np.testing.assert_array_equal(tar.ids, mds.ids)


def test_same_samples_give_identical_bytes(tmp_path):
    records_a, records_b = write_set(tmp_path / "a"), write_set(tmp_path / "b")
    assert records_a == records_b
    for record in records_a:
        files_a = sorted(p.name for p in (tmp_path / "a" / record.name).iterdir())
        assert files_a == sorted(p.name for p in (tmp_path / "b" / record.name).iterdir())
        assert INDEX_NAME in files_a and len(files_a) == 2  # one MDS file per shard at the default size limit
        for name in files_a:
            assert (tmp_path / "a" / record.name / name).read_bytes() == (
                tmp_path / "b" / record.name / name
            ).read_bytes()
        assert hash_mds_shard(tmp_path / "a" / record.name) == (record.num_bytes, record.sha256)
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()


def test_writes_leave_no_temporary_and_failures_keep_the_old_shard(tmp_path):
    write_set(tmp_path)
    assert leftovers(tmp_path) == []
    path = tmp_path / mds_shard_name(0)
    before = hash_mds_shard(path)

    def failing_samples():
        yield make_sample(0)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_mds_shard(path, failing_samples(), FIELDS, 0)
    with pytest.raises(ShardError, match=r"field 'x' is not valid npy for MDS.*bool"):
        write_mds_shard(path, [{**make_sample(0), "x": np.ones(3, bool)}], FIELDS, 0)
    with pytest.raises(ShardError, match="no samples given"):
        write_mds_shard(path, [], FIELDS, 0)
    with pytest.raises(ShardError, match="field 'label' is not valid cls"):
        write_mds_shard(path, [{**make_sample(0), "label": b"3"}], FIELDS, 0)
    assert hash_mds_shard(path) == before and leftovers(tmp_path) == []
    rewritten = write_mds_shard(path, [make_sample(0)], FIELDS, 0)  # replacing a complete shard works
    assert rewritten.num_samples == 1 and leftovers(tmp_path) == []


def test_flipped_byte_fails_sha256_and_names_shard(tmp_path):
    records = write_set(tmp_path)
    path = tmp_path / mds_shard_name(1) / "shard.00000.mds"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last sample's data: size and offsets unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001\.mds fails its sha256 check.*re-run"):
        MDSDataset(tmp_path)
    with pytest.raises(ShardError, match=r"shard-000001\.mds fails its sha256 check"):
        check_mds_shard(tmp_path, records[1])
    assert len(MDSDataset(tmp_path, verify="size")) == 9  # not hashed, so not caught
    check_mds_shard(tmp_path, records[0])


def test_truncated_mds_file_is_named(tmp_path):
    write_set(tmp_path)
    path = tmp_path / mds_shard_name(2) / "shard.00000.mds"
    path.write_bytes(path.read_bytes()[:-10])
    for verify in ("sha256", "size"):
        with pytest.raises(ShardError, match=r"shard-000002\.mds has \d+ bytes but the manifest says"):
            MDSDataset(tmp_path, verify=verify)
    with pytest.raises(ShardError, match=r"shard-000002\.mds has shard\.00000\.mds of \d+ bytes.*truncated"):
        MDSDataset(tmp_path, verify="none")


def test_manifest_count_disagreeing_with_shard(tmp_path):
    write_set(tmp_path)
    path = tmp_path / MANIFEST_NAME
    document = json.loads(path.read_text())
    document["shards"][2]["num_samples"], document["num_samples"] = 1, 8  # size and sha256 stay right
    path.write_text(json.dumps(document))
    with pytest.raises(ShardError, match=r"shard-000002\.mds holds 2 samples but the manifest says 1"):
        MDSDataset(tmp_path)


def test_missing_shard_and_wrong_format_are_named(tmp_path):
    write_both(tmp_path, 6, 3)
    with pytest.raises(ShardError, match=r"holds webdataset tar shards, not MDS.*ShardDataset"):
        MDSDataset(tmp_path / "tar")
    shutil.rmtree(tmp_path / "mds" / mds_shard_name(1))
    with pytest.raises(ShardError, match=r"shard-000001\.mds is listed in the manifest but missing.*re-run"):
        MDSDataset(tmp_path / "mds", verify="none")


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle_shard(path, target) -> None:
    with _streaming().MDSWriter(columns={"label": "pkl", "x": "ndarray"}, out=str(path)) as writer:
        writer.write({"label": CreatesFileWhenUnpickled(target), "x": np.zeros(3)})


def test_pickle_column_is_refused_and_never_unpickled(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "marker"
    write_pickle_shard(tmp_path / "control_set", control)
    from streaming import LocalDataset

    LocalDataset(str(tmp_path / "control_set"))[0]  # the payload is live: streaming's own reader unpickles it
    assert control.exists()

    shard_dir, path = tmp_path / "set", tmp_path / "set" / mds_shard_name(0)
    write_pickle_shard(path, marker)
    num_bytes, sha256 = hash_mds_shard(path)
    record = ShardRecord(path.name, 0, 1, num_bytes, sha256)
    write_mds_manifest(shard_dir, [record], {"label": "cls", "x": "npy"})
    for verify in ("sha256", "none"):
        with pytest.raises(ShardError, match=r"shard-000000\.mds declares column 'label' with MDS encoding 'pkl'"):
            MDSDataset(shard_dir, verify=verify)
    with pytest.raises(ShardError, match="never loaded"):
        check_mds_shard(shard_dir, record)
    assert not marker.exists()


def test_schema_must_match_the_manifest(tmp_path):
    records = write_set(tmp_path)
    write_mds_manifest(tmp_path, records, {**FIELDS, "caption": "json"})
    with pytest.raises(ShardError, match=r"shard-000000\.mds has an invalid MDS index\.json.*do not match"):
        MDSDataset(tmp_path)


def test_dataset_pickles_without_readers(tmp_path):
    write_set(tmp_path)
    dataset = MDSDataset(tmp_path)
    expected = dataset[4]
    assert dataset._readers
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._readers == {}
    assert_same_sample(copy[4], expected)
    dataset.close()
    assert dataset._readers == {} and dataset[4]["__index__"] == 4


def test_check_mds_shard_names_a_count_mismatch(tmp_path):
    records = write_set(tmp_path)
    with pytest.raises(ShardError, match="holds 3 samples but the manifest says 2"):
        check_mds_shard(tmp_path, dataclasses.replace(records[0], num_samples=2), verify="none")


def test_big_endian_arrays_keep_their_values(tmp_path):
    x = np.arange(6, dtype=">f4").reshape(2, 3)  # MDS stores raw native bytes: the writer must convert
    record = write_mds_shard(tmp_path / mds_shard_name(0), [{"x": x}], {"x": "npy"}, 0)
    write_mds_manifest(tmp_path, [record], {"x": "npy"})
    got = MDSDataset(tmp_path)[0]["x"]
    assert got.dtype == np.float32 and got.shape == (2, 3)  # native order (a tar shard keeps ">f4")
    np.testing.assert_array_equal(got, x)


@pytest.mark.slow
def test_jobs_write_mds_and_training_reads_it_like_webdataset(tiny, tmp_path):
    """The bank job writes either format; training on either gives the same run."""
    from tests.conftest import assert_ok, read_metrics, run_entry, train_args
    from tests.jobs.test_generate_bank import run_bank

    banks = {fmt: tmp_path / f"bank_{fmt}" for fmt in ("wds", "mds")}
    for fmt, directory in banks.items():
        assert_ok(run_bank(tiny, directory, f"data.format={fmt}"))
    wds, mds = open_shard_set(banks["wds"]), open_shard_set(banks["mds"])
    assert isinstance(mds, MDSDataset) and len(mds) == len(wds)
    for i in range(len(wds)):
        assert np.array_equal(mds[i]["x"], wds[i]["x"]) and mds[i]["label"] == wds[i]["label"]
    runs = {}
    for fmt, directory in banks.items():
        runs[fmt] = tmp_path / f"run_{fmt}"
        assert_ok(run_entry("train.py", train_args(tiny, runs[fmt], f"data.bank={directory}", "train.steps=3")))
    assert [m["loss/total"] for m in read_metrics(runs["wds"])] == [m["loss/total"] for m in read_metrics(runs["mds"])]


def test_read_decodes_only_the_fields_asked(tmp_path):
    write_set(tmp_path)
    dataset = MDSDataset(tmp_path)
    for index in (0, 4, 8):
        whole = dataset[index]
        for fields in (("x_flip", "label"), ("img",), ("caption", "meta", "x")):
            part = dataset.read(index, fields)
            assert set(part) == {*fields, "__index__"}
            for name in fields:
                assert_same_sample({name: part[name]}, {name: whole[name]})
    with pytest.raises(ShardError, match=r"has no field \['y'\]"):
        dataset.read(0, ("x", "y"))
