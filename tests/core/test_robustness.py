"""Runs that survive: kill and resume, crash mid-save, preemption, elastic resume, multi-node, uneven ranks,
non-finite steps. Real processes on the CPU (DeepSpeed launcher or torchrun, gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import (
    ROOT,
    assert_ok,
    child_env,
    copy_as_stopped_after,
    free_port,
    launch_command,
    read_metrics,
    run_entry,
    train_args,
)
from tests.core.test_train_distributed import exported
from trainer.ema import read_saved
from trainer.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow
LONG = ("train.steps=120", "run.ckpt_every=10", "run.log_every=1", "debug.sample_ledger=true", "run.keep_last=2")


def last_losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses; a step replayed after a crash keeps its last (committed) value."""
    return {m["step"]: m["loss/total"] for m in read_metrics(run_dir)}


def ledger(run_dir: Path) -> list[tuple]:
    rows = []
    for path in (run_dir / "ledger").glob("rank*.jsonl"):
        rows += [tuple(json.loads(line).values()) for line in path.read_text().splitlines()]
    return sorted(rows)


def assert_identical_runs(a: Path, b: Path, rtol: float = 1e-6) -> None:
    la, lb = last_losses(a), last_losses(b)
    assert la.keys() == lb.keys()
    np.testing.assert_allclose([la[k] for k in sorted(la)], [lb[k] for k in sorted(lb)], rtol=rtol)
    for which in ("raw", "ema"):
        wa, wb = exported(a, which), exported(b, which)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=1e-7, msg=f"{which}: {key}")
    if (a / "ledger").is_dir():
        assert ledger(a) == ledger(b), "the consumed samples differ: lost or duplicated samples"
        assert len(ledger(a)) == len(set(ledger(a)))


def start(args: list[str], num_procs: int = 2) -> subprocess.Popen:
    """The deepspeed launcher, whose exit status reports the ranks' (75 for a preempted run)."""
    command = [*launch_command("deepspeed", num_procs), "launch/train.py", *args]
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
    launcher = start(train_args(tiny, run, *LONG, "train.zero_stage=2"))
    wait_for_checkpoint(run, launcher, 20)
    training_ranks(launcher)[1].send_signal(signal.SIGUSR1)  # only one rank is told
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "preempted: saved the checkpoint of step" in output
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 20 <= saved < 120  # saved at the step boundary after the signal, before the end
    assert_ok(run_entry("train.py", train_args(tiny, run, *LONG, "train.zero_stage=2") + ["--resume"], num_procs=2))
    assert_identical_runs(run, uninterrupted)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_elastic_resume(tiny, tmp_path, first, second):
    """A run on `first` ranks, rewound to its step-3 checkpoint and resumed on `second` ranks, ends as it did."""
    common = ("train.steps=6", "run.ckpt_every=3", "train.zero_stage=2", "debug.sample_ledger=true")
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    assert_ok(run_entry("train.py", train_args(tiny, straight, *common), num_procs=first))
    copy_as_stopped_after(straight, elastic, 3)
    proc = run_entry("train.py", train_args(tiny, elastic, *common) + ["--resume"], num_procs=second)
    assert_ok(proc)
    assert (elastic / "checkpoints" / "step_00000003_universal").is_dir()
    assert_identical_runs(elastic, straight, rtol=1e-5)


def test_resume_with_another_global_batch_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    assert_ok(run_entry("train.py", train_args(tiny, run, "train.steps=2")))
    proc = run_entry("train.py", train_args(tiny, run, "train.steps=4", "train.global_batch_size=4") + ["--resume"])
    assert proc.returncode == 2
    assert "train.global_batch_size: 8 -> 4" in proc.stderr and "run.allow_plan_change=true" in proc.stderr


def test_two_nodes_started_like_slurm(tiny, tmp_path):
    """Two separate launches (node rank 0 and 1, master on loopback) train and save as one job."""
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    common = ("train.steps=4", "train.zero_stage=2")
    assert_ok(run_entry("train.py", train_args(tiny, single, *common), num_procs=2))
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = child_env()
    procs = [
        subprocess.Popen(
            [
                *torchrun,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "launch/train.py",
                *train_args(tiny, nodes, *common),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert len(list((nodes / "checkpoints" / "step_00000004").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert_identical_runs(nodes, single, rtol=1e-6)


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
