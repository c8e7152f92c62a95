"""Runs that survive: kill and resume, crash mid-save, preemption, uneven ranks, non-finite steps, a shard cut
under a running job (elastic resume and two nodes: tests/core/test_train_distributed.py). Real processes on the
CPU (the deepspeed launcher or torchrun, gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import (
    ROOT,
    assert_ok,
    child_env,
    launch_command,
    read_metrics,
    run_entry,
    train_args,
)
from tests.core.test_train_distributed import assert_identical_runs, ledger
from trainer.ema import read_saved
from trainer.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow
LONG = ("train.steps=120", "run.ckpt_every=10", "run.log_every=1", "debug.sample_ledger=true", "run.keep_last=2")


def start(args: list[str], num_procs: int = 2, launcher: str = "torchrun") -> subprocess.Popen:
    """A training run in the background (the deepspeed launcher's exit status reports the ranks': 75 when
    preempted; torchrun's does not)."""
    command = [*launch_command(launcher, num_procs), "launch/train.py", *args]
    return subprocess.Popen(
        command, env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def training_ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())
    ]


def wait_for_checkpoint(run_dir: Path, launcher: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        tag = (run_dir / "checkpoints" / "latest").read_text() if (run_dir / "checkpoints" / "latest").exists() else ""
        if tag and int(tag.split("_")[1]) >= step:
            return
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint of step {step} within {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert_ok(run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2"), num_procs=2))
    return run


def test_sigkill_one_rank_then_resume(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    launcher = start(train_args(tiny, run, *LONG, "train.zero_stage=2"))
    wait_for_checkpoint(run, launcher, 30)
    training_ranks(launcher)[-1].kill()  # SIGKILL, mid-training
    assert launcher.wait(timeout=120) != 0
    assert int((run / "checkpoints" / "latest").read_text().split("_")[1]) < 120
    assert_ok(run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2") + ["--resume"], num_procs=2))
    assert_identical_runs(run, uninterrupted)
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep_last pruned the older ones


def test_crash_in_the_middle_of_a_save(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    crash = ("debug.crash_in_save_step=40", "debug.crash_rank=1")
    proc = run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2", *crash), num_procs=2)
    assert proc.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"  # the pointer did not move
    assert (run / "checkpoints" / "step_00000040").is_dir()  # although part of step 40 was written
    assert_ok(run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2") + ["--resume"], num_procs=2))
    assert_identical_runs(run, uninterrupted)


def test_preemption_signal_saves_and_requeues(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    launcher = start(train_args(tiny, run, *LONG, "train.zero_stage=2"), launcher="deepspeed")
    wait_for_checkpoint(run, launcher, 20)
    training_ranks(launcher)[1].send_signal(signal.SIGUSR1)  # only one rank is told
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "preempted: saved the checkpoint of step" in output
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 20 <= saved < 120  # saved at the step boundary after the signal, before the end
    assert_ok(run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2") + ["--resume"], num_procs=2))
    assert_identical_runs(run, uninterrupted)


def test_three_ranks_with_uneven_shards(tmp_path):
    from tests.tiny import make_shards, make_tiny_dit

    pretrained = make_tiny_dit(tmp_path / "pretrained")
    target = make_shards(tmp_path / "target", 37, num_classes=4, per_shard=11)  # shards of 11, 11, 11, 4
    bank = make_shards(tmp_path / "bank", 13, num_classes=10, per_shard=5, seed=1)  # 5, 5, 3
    run = tmp_path / "run"
    args = ["--config", "tiny_cpu", f"model.pretrained={pretrained}", "model.num_classes=4", f"data.target={target}",
            f"data.bank={bank}", f"run.dir={run}", "train.global_batch_size=6", "train.micro_batch_size=2",
            "train.steps=9", "debug.sample_ledger=true"]  # fmt: skip
    assert_ok(run_entry("train.py", args, num_procs=3))
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 10))
    per_rank = {
        p.name: [json.loads(line)["step"] for line in p.read_text().splitlines()] for p in (run / "ledger").glob("*")
    }
    assert sorted(per_rank) == ["rank0.jsonl", "rank1.jsonl", "rank2.jsonl"]
    assert all(sorted(set(steps)) == list(range(9)) and len(steps) == 18 for steps in per_rank.values())
    target_draws = [row for row in ledger(run) if row[2] == 0]
    assert len(target_draws) == 27 and len({row[3] for row in target_draws}) == 27  # one epoch, no repeats


def module_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def ema_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return read_saved(run / "checkpoints" / f"step_{step:08d}")


def test_nan_on_one_rank_skips_the_step_everywhere(tiny, tmp_path):
    run = tmp_path / "run"
    args = ("train.steps=5", "run.ckpt_every=1", "run.keep_last=0", "debug.nan_at_step=2", "debug.nan_rank=1",
            "optim.warmup_steps=10")  # fmt: skip
    assert_ok(run_entry("train.py", train_args(tiny, run, *args), num_procs=2))
    before, after, later = module_weights(run, 2), module_weights(run, 3), module_weights(run, 4)
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 (index 2) changed nothing
    assert any(not torch.equal(after[k], later[k]) for k in after)  # training went on
    assert all(torch.equal(v, ema_weights(run, 3)[k]) for k, v in ema_weights(run, 2).items())
    metrics = read_metrics(run)
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    lrs = [m["lr"] for m in metrics]  # warm-up advances with applied steps only
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] < lrs[4]
    state = json.loads((run / "checkpoints" / "step_00000005" / "run_state.json").read_text())
    assert (state["applied_steps"], state["skipped_steps"]) == (4, 1)


def test_consecutive_nans_stop_the_run_with_the_step(tiny, tmp_path):
    args = ("train.steps=8", "debug.nan_at_step=1", "debug.nan_steps=10", "debug.nan_rank=0",
            "train.max_consecutive_skips=3")  # fmt: skip
    proc = run_entry("train.py", train_args(tiny, tmp_path / "run", *args), num_procs=2)
    assert proc.returncode == 1
    assert "step 4: 3 consecutive steps had a non-finite loss or gradient" in proc.stderr


def test_shard_truncated_while_training_is_named(tiny, tmp_path):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(tiny["target"], target)
    run = tmp_path / "run"
    launcher = start(train_args(tiny, run, *LONG, f"data.target={target}", "train.steps=100000"), num_procs=2)
    wait_for_checkpoint(run, launcher, 10)
    shard = target / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:7000])  # cut inside a member, under the running job
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0
    assert "shard-000001.tar" in output and "truncated" in output
