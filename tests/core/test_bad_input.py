"""Bad input stops `launch/train.py` before any work, with a message naming the key or file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from data.shards import ShardError
from launch.train import main
from tests.conftest import train_args


def train_error(capsys, args) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_unknown_config_key(tiny, tmp_path, capsys):
    err = train_error(capsys, train_args(tiny, tmp_path / "run", "train.global_batchsize=8"))
    assert "train.global_batchsize" in err and "global_batch_size" in err
    assert not (tmp_path / "run").exists()


def test_missing_required_key(tmp_path, capsys):
    err = train_error(capsys, ["--config", "tiny_cpu", f"run.dir={tmp_path / 'run'}"])
    assert "model.pretrained" in err and "data.target" in err


def test_global_batch_not_divisible(tiny, tmp_path, capsys):
    err = train_error(
        capsys, train_args(tiny, tmp_path / "run", "train.global_batch_size=8", "train.micro_batch_size=3")
    )
    assert "train.global_batch_size=8 is not divisible by ranks x train.micro_batch_size = 1 x 3" in err
    assert not (tmp_path / "run").exists()


def test_missing_pretrained_folder(tiny, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    err = train_error(capsys, train_args(tiny, tmp_path / "run", f"model.pretrained={missing}"))
    assert f"model.pretrained={missing} does not exist" in err and "local diffusers DiT folder" in err
    assert not (tmp_path / "run").exists()


def test_label_space_too_large(tiny, tmp_path, capsys):
    err = train_error(capsys, train_args(tiny, tmp_path / "run", "model.num_classes=11"))
    assert "model.num_classes=11 is larger than the pre-trained label space (10 classes)" in err
    assert "model.class_init=fresh" in err
    assert not (tmp_path / "run").exists()


def test_target_classes_do_not_fit_the_label_space(tiny, tmp_path, capsys):
    err = train_error(capsys, train_args(tiny, tmp_path / "run", "model.num_classes=3"))
    assert "target data has 4 classes" in err and "model.num_classes=4" in err


def member_boundary(shard) -> int:
    """The byte offset where the shard's second sample begins (tar headers are 512-byte blocks)."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    return members[2].offset  # two members (x, label) per sample


@pytest.mark.parametrize("damage", ["flipped_byte", "count", "truncated_mid_member", "truncated_at_boundary"])
def test_shard_disagreeing_with_manifest(tiny, tmp_path, capsys, damage):
    target = tmp_path / "target"
    shutil.copytree(tiny["target"], target)
    shard = target / "shard-000001.tar"
    if damage == "flipped_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "sha256"
    elif damage.startswith("truncated"):
        data = shard.read_bytes()
        cut = member_boundary(shard) if damage == "truncated_at_boundary" else len(data) // 2 + 7
        shard.write_bytes(data[:cut])
        expected = "bytes"
    else:
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["shards"][1]["num_samples"] -= 1
        manifest["shards"][2]["first_index"] -= 1
        manifest["num_samples"] -= 1
        (target / "manifest.json").write_text(json.dumps(manifest))
        expected = "manifest says 15"
    err = train_error(capsys, train_args(tiny, tmp_path / "run", f"data.target={target}"))
    assert "shard-000001.tar" in err and expected in err
    assert not (tmp_path / "run").exists()


def test_diff_tuning_without_a_bank(tiny, tmp_path, capsys):
    err = train_error(capsys, train_args(tiny, tmp_path / "run", "data.bank=null"))
    assert "method.bank_ratio=0.5 needs a memory bank: set data.bank=" in err
    assert not (tmp_path / "run").exists()


def test_missing_bank_manifest(tiny, tmp_path, capsys):
    bank = tmp_path / "bank"
    shutil.copytree(tiny["bank"], bank)
    (bank / "manifest.json").unlink()
    err = train_error(capsys, train_args(tiny, tmp_path / "run", f"data.bank={bank}"))
    assert str(bank / "manifest.json") in err and "generate_bank.py" in err


def test_existing_run_dir_is_never_touched(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("results")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    err = train_error(capsys, train_args(tiny, run))
    assert f"run directory {run} already exists" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert (run / "precious.txt").read_text() == "results"


def test_each_shard_is_hashed_by_one_rank(tiny, tmp_path, monkeypatch):
    """data.verify=sha256 on 2 ranks: rank r hashes shards r, r + 2, ... of the target and the bank, and the rank
    that finds the bad one names it (the ranks then agree through trainer.distributed.first_error)."""
    import data.formats
    from trainer import distributed
    from trainer.setup import verify_shards

    target = tmp_path / "target"
    shutil.copytree(tiny["target"], target)
    shard = target / "shard-000001.tar"
    content = bytearray(shard.read_bytes())
    content[-1500] ^= 0xFF  # inside the last sample's data: the size and the tar headers still agree
    shard.write_bytes(bytes(content))
    hashed = []
    monkeypatch.setattr(data.formats, "file_sha256", lambda path, real=data.formats.file_sha256: (
        hashed.append(path.name), real(path))[1])  # fmt: skip
    monkeypatch.setattr(distributed, "first_error", lambda error: error)  # one process plays both ranks
    directories = [str(target), str(tiny["bank"])]  # 3 target shards, then 3 bank shards
    verify_shards(directories, rank=0, world_size=2)
    assert hashed == ["shard-000000.tar", "shard-000002.tar", "shard-000001.tar"]  # target 0, 2; bank 1
    with pytest.raises(ShardError, match=r"target/shard-000001\.tar fails its sha256 check.*found by rank 1"):
        verify_shards(directories, rank=1, world_size=2)
