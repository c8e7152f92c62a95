"""Shard sets: round trip by global index, reproducible bytes, atomic writes and every start-up check."""

import dataclasses
import hashlib
import io
import json
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from data.shards import (
    MANIFEST_NAME,
    ShardDataset,
    ShardError,
    ShardRecord,
    check_shard,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)

FIELDS = {"x": "npy", "label": "cls", "caption": "txt", "info": "json"}
SIZES = (3, 4, 2)  # shards hold indices 0-2, 3-6, 7-8


def make_sample(index: int) -> dict:
    rng = np.random.default_rng(index)
    return {
        "x": rng.standard_normal((4, 2, 3)).astype(np.float16 if index % 2 else np.float32),
        "label": index % 7,
        "caption": f"sample {index} — é",
        "info": {"index": index, "tags": ["a", "b"]},
    }


def write_set(directory, sizes=SIZES, fields=FIELDS) -> list[ShardRecord]:
    records, first_index = [], 0
    for shard_id, num_samples in enumerate(sizes):
        samples = (make_sample(i) for i in range(first_index, first_index + num_samples))
        records.append(write_shard(directory / shard_name(shard_id), samples, fields, first_index))
        first_index += num_samples
    write_manifest(directory, records, fields, {"classes": ["cat", "dog"]})
    return records


def edit_manifest(directory, edit) -> None:
    path = directory / MANIFEST_NAME
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_round_trip_across_shards(tmp_path):
    records = write_set(tmp_path)
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 9 == dataset.manifest.num_samples
    assert [r.first_index for r in records] == [0, 3, 7] and [r.num_samples for r in records] == [3, 4, 2]
    assert dataset.manifest.fields == FIELDS and dataset.manifest.meta == {"classes": ["cat", "dog"]}
    for index in [8, 0, 2, 3, 6, 7, 4]:  # out of order, on both sides of each shard boundary
        sample, expected = dataset[index], make_sample(index)
        assert sample["x"].dtype == expected["x"].dtype and sample["x"].shape == (4, 2, 3)
        np.testing.assert_array_equal(sample["x"], expected["x"])
        assert sample["label"] == expected["label"] and isinstance(sample["label"], int)
        assert sample["caption"] == expected["caption"] and sample["info"] == expected["info"]
        assert sample["__index__"] == index
    assert dataset[np.int64(5)]["__index__"] == 5
    for bad_index in (-1, 9, 100):
        with pytest.raises(IndexError, match="out of range"):
            dataset[bad_index]


def test_png_round_trip(tmp_path):
    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    gray = np.full((4, 4), 7, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    samples = [{"img": rgb}, {"img": Image.fromarray(gray)}, {"img": buffer.getvalue()}]
    record = write_shard(tmp_path / shard_name(0), samples, {"img": "png"}, 0)
    write_manifest(tmp_path, [record], {"img": "png"})
    dataset = ShardDataset(tmp_path)
    np.testing.assert_array_equal(dataset[0]["img"], rgb)
    np.testing.assert_array_equal(dataset[1]["img"], gray)
    np.testing.assert_array_equal(dataset[2]["img"], rgb)


def test_same_samples_give_identical_bytes(tmp_path, monkeypatch):
    records_a = write_set(tmp_path / "a")
    monkeypatch.setattr(time, "time", lambda: 2.0e9)  # a much later clock must not reach the tar headers
    records_b = write_set(tmp_path / "b")
    assert records_a == records_b
    for record in records_a:
        data = (tmp_path / "a" / record.name).read_bytes()
        assert data == (tmp_path / "b" / record.name).read_bytes()
        assert record.num_bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()


def test_manifest_is_written_atomically(tmp_path):
    records = write_set(tmp_path)
    assert leftovers(tmp_path) == []
    document = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert document["format"] == "difftune-shards" and document["version"] == 1
    assert document["num_samples"] == 9 and document["fields"] == FIELDS
    assert [ShardRecord(**entry) for entry in document["shards"]] == records
    # A failed rewrite leaves the previous manifest in place and no temporary file behind.
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    with pytest.raises(TypeError):
        write_manifest(tmp_path, records, FIELDS, meta={"not json": object()})
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before and leftovers(tmp_path) == []


def test_failed_shard_write_keeps_old_shard_and_leaves_no_temporary(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [make_sample(0), make_sample(1)], FIELDS, 0)
    before = path.read_bytes()

    def failing_samples():
        yield make_sample(0)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_shard(path, failing_samples(), FIELDS, 0)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_non_contiguous_records_rejected(tmp_path):
    records = write_set(tmp_path / "set")
    (tmp_path / "set" / MANIFEST_NAME).unlink()
    gap = [records[0], records[2]]
    overlap = [records[0], dataclasses.replace(records[1], first_index=2), records[2]]
    not_from_zero = records[1:]
    for bad in (gap, overlap, not_from_zero):
        with pytest.raises(ShardError, match="without gaps or overlaps"):
            write_manifest(tmp_path / "set", bad, FIELDS)
    with pytest.raises(ShardError, match="listed twice"):
        write_manifest(tmp_path / "set", [records[0], dataclasses.replace(records[1], name=records[0].name)], FIELDS)
    assert not (tmp_path / "set" / MANIFEST_NAME).exists()
    write_manifest(tmp_path / "set", list(reversed(records)), FIELDS)  # order given does not matter
    assert read_manifest(tmp_path / "set").shards == records


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(ShardError, match=r"manifest.json.*launch/prepare_data.py or launch/generate_bank.py"):
        ShardDataset(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json is not a valid shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ShardError, match="expected format 'difftune-shards'"):
        read_manifest(tmp_path)


def test_manifest_cannot_point_outside_the_directory(tmp_path):
    write_set(tmp_path)
    edit_manifest(tmp_path, lambda doc: doc["shards"][0].update(name="../shard-000000.tar"))
    with pytest.raises(ShardError, match="must be a plain file name"):
        ShardDataset(tmp_path)


def test_missing_shard_is_named(tmp_path):
    write_set(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(ShardError, match=r"shard-000001\.tar is listed in the manifest but missing.*re-run"):
        ShardDataset(tmp_path)


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_sha256_and_names_shard(tmp_path):
    records = write_set(tmp_path)
    flip_byte(tmp_path / shard_name(1), 600)  # inside the first member's data, size unchanged
    with pytest.raises(ShardError, match=r"shard-000001\.tar fails its sha256 check"):
        ShardDataset(tmp_path)
    with pytest.raises(ShardError, match=r"shard-000001\.tar fails its sha256 check"):
        check_shard(tmp_path, records[1])
    check_shard(tmp_path, records[0])


def test_verify_size_skips_hashing_but_catches_size_change(tmp_path):
    write_set(tmp_path)
    flip_byte(tmp_path / shard_name(1), 600)
    assert len(ShardDataset(tmp_path, verify="size")) == 9  # same size: not hashed, so not caught
    path = tmp_path / shard_name(1)
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(ShardError, match=r"shard-000001\.tar has \d+ bytes but the manifest says"):
        ShardDataset(tmp_path, verify="size")
    with pytest.raises(ValueError, match="verify must be one of"):
        ShardDataset(tmp_path, verify="md5")


def test_truncated_shard_is_named(tmp_path):
    write_set(tmp_path)
    path = tmp_path / shard_name(2)
    with tarfile.open(path) as tar:
        last_member = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last_member.offset_data + 10])  # cut inside the last member
    with pytest.raises(ShardError, match=r"shard-000002\.tar has \d+ bytes but the manifest says"):
        ShardDataset(tmp_path)
    with pytest.raises(ShardError, match=r"shard-000002\.tar is truncated"):
        ShardDataset(tmp_path, verify="none")


def test_truncation_after_start_up_is_named_on_read(tmp_path):
    write_set(tmp_path)
    dataset = ShardDataset(tmp_path)
    path = tmp_path / shard_name(2)
    path.write_bytes(path.read_bytes()[:1024])
    with pytest.raises(ShardError, match=r"shard-000002\.tar is truncated \(short read of sample 8\)"):
        dataset[8]


def test_manifest_count_disagreeing_with_shard(tmp_path):
    records = write_set(tmp_path)

    def drop_one_sample(document):  # sha256 and size stay right: only the count is wrong
        document["shards"][2]["num_samples"] = 1
        document["num_samples"] = 8

    edit_manifest(tmp_path, drop_one_sample)
    with pytest.raises(ShardError, match=r"shard-000002\.tar holds 2 samples but the manifest says 1"):
        ShardDataset(tmp_path)
    with pytest.raises(ShardError, match=r"shard-000002\.tar holds 2 samples but the manifest says 1"):
        check_shard(tmp_path, dataclasses.replace(records[2], num_samples=1))


def test_shard_keys_must_match_manifest_indices(tmp_path):
    record = write_shard(tmp_path / shard_name(0), [make_sample(0)], FIELDS, first_index=5)
    write_manifest(tmp_path, [dataclasses.replace(record, first_index=0)], FIELDS)
    with pytest.raises(ShardError, match=r"shard-000000\.tar holds sample keys \['0000000005'\] outside"):
        ShardDataset(tmp_path)


def test_shard_members_must_match_manifest_fields(tmp_path):
    records = write_set(tmp_path)
    write_manifest(tmp_path, records, {"x": "npy", "label": "cls"})
    with pytest.raises(ShardError, match=r"shard-000000\.tar has sample 0 with members"):
        ShardDataset(tmp_path)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_member_is_refused_and_never_unpickled(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "marker"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(control)))
    assert control.exists()  # the payload is live: unpickling it would create the marker

    shard_dir, path = tmp_path / "set", tmp_path / "set" / shard_name(0)
    shard_dir.mkdir()
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    members = {"0000000000.x.npy": npy.getvalue(), "0000000000.x.pyd": pickle.dumps(CreatesFileWhenUnpickled(marker))}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            tar.addfile(_info(name, len(data)), io.BytesIO(data))
    data = path.read_bytes()
    record = ShardRecord(path.name, 0, 1, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(shard_dir, [record], {"x": "npy"})
    for verify in ("sha256", "none"):
        with pytest.raises(ShardError, match=r"shard-000000\.tar holds member '0000000000\.x\.pyd'.*refused"):
            ShardDataset(shard_dir, verify=verify)
    with pytest.raises(ShardError, match=r"0000000000\.x\.pyd"):
        check_shard(shard_dir, record)
    assert not marker.exists()


def test_schema_mismatch_at_write_time(tmp_path):
    path = tmp_path / shard_name(0)
    missing = [make_sample(0), {k: v for k, v in make_sample(1).items() if k != "caption"}]
    with pytest.raises(ShardError, match=r"sample 1 has fields \['info', 'label', 'x'\] but the schema is"):
        write_shard(path, missing, FIELDS, 0)
    with pytest.raises(ShardError, match="sample 7 has fields"):
        write_shard(path, [{**make_sample(7), "extra": 1}], FIELDS, 7)
    with pytest.raises(ShardError, match="field 'label' is not valid cls"):
        write_shard(path, [{**make_sample(0), "label": "cat"}], FIELDS, 0)
    with pytest.raises(ShardError, match="field 'x' is not valid npy"):
        write_shard(path, [{**make_sample(0), "x": np.array([{"a": 1}], dtype=object)}], FIELDS, 0)
    with pytest.raises(ShardError, match="has extension 'pkl'"):
        write_shard(path, [{"x": 1}], {"x": "pkl"}, 0)
    with pytest.raises(ShardError, match="no samples given"):
        write_shard(path, [], FIELDS, 0)
    assert list(tmp_path.iterdir()) == []


def test_dataset_pickles_without_open_files(tmp_path):
    write_set(tmp_path)
    dataset = ShardDataset(tmp_path)
    expected = dataset[4]
    assert dataset._fds  # a descriptor is open in this process...
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._fds == {}  # ...but not carried into the copy, which reopens lazily
    sample = copy[4]
    np.testing.assert_array_equal(sample["x"], expected["x"])
    assert sample["caption"] == expected["caption"]
    dataset.close()
    assert dataset._fds == {} and dataset[4]["__index__"] == 4


def test_forked_dataloader_workers_read_correct_samples(tmp_path):
    torch = pytest.importorskip("torch")
    write_set(tmp_path)
    dataset = ShardDataset(tmp_path)
    dataset[0]  # the parent holds an open descriptor that forked workers inherit
    order = [8, 1, 5, 3, 0, 7, 2, 6, 4]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=order, num_workers=2, multiprocessing_context="fork"
    )
    samples = list(loader)
    assert [int(s["__index__"]) for s in samples] == order
    for sample in samples:
        np.testing.assert_array_equal(np.asarray(sample["x"]), make_sample(int(sample["__index__"]))["x"])


def test_read_decodes_only_the_fields_asked(tmp_path):
    records = write_set(tmp_path)
    dataset = ShardDataset(tmp_path, verify="size")
    whole = dataset[4]
    part = dataset.read(4, ("label", "x"))
    assert set(part) == {"label", "x", "__index__"}
    assert part["label"] == whole["label"] and part["__index__"] == 4
    np.testing.assert_array_equal(part["x"], whole["x"])
    assert set(dataset.read(4)) == set(FIELDS) | {"__index__"}
    # Garble sample 4's caption in place (same size): reads that skip it still work, a whole read fails.
    path = tmp_path / records[1].name
    with tarfile.open(path) as tar:
        member = tar.getmember("0000000004.caption.txt")
    data = bytearray(path.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = b"\xff" * member.size
    path.write_bytes(bytes(data))
    assert dataset.read(4, ("x", "label"))["label"] == whole["label"]
    with pytest.raises(ShardError, match="undecodable 'caption' in sample 4"):
        dataset[4]
    with pytest.raises(ShardError, match=r"has no field \['x_flip'\]"):
        dataset.read(4, ("x", "x_flip"))
