"""Shared fixtures: tiny models and shard sets on disk, and a launcher for real multi-process runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_shards, make_tiny_dit

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")


SHM = Path("/dev/shm")


@pytest.fixture(autouse=True)
def free_leaked_shared_memory():
    """A killed rank cannot free its DeepSpeed all-reduce buffer in /dev/shm (~69 MB): free what a test left."""
    before = set(SHM.glob("deepspeed_*")) if SHM.is_dir() else set()
    yield
    for buffer in (set(SHM.glob("deepspeed_*")) if SHM.is_dir() else set()) - before:
        buffer.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny pixel-space DiT (10 classes) and its target (4 classes) and bank shard sets."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "pretrained": make_tiny_dit(root / "pretrained"),
        "target": make_shards(root / "target", 40, num_classes=4, per_shard=16),
        "bank": make_shards(root / "bank", 24, num_classes=10, per_shard=10, seed=1),
        "root": root,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a launched job: one thread per process (two ranks on two cores would otherwise
    oversubscribe the machine many times), and none of the rendezvous variables that in-process tests set
    in this process (a child would try to bind this process's port)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_entry(script: str, args: list[str], num_procs: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `launch/<script>` as users do: one plain process, or `deepspeed --num_gpus N` on the CPU."""
    env = child_env()
    if num_procs == 1:
        command = [sys.executable, str(ROOT / "launch" / script)]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        command = [
            launcher,
            "--num_gpus",
            str(num_procs),
            "--master_port",
            str(free_port()),
            str(ROOT / "launch" / script),
        ]
    return subprocess.run(command + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_args(tiny: dict[str, Path], run_dir: Path, *overrides: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"model.pretrained={tiny['pretrained']}", "model.num_classes=4",
        f"data.target={tiny['target']}", f"data.bank={tiny['bank']}", f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def copy_as_stopped_after(run_dir: Path, copy: Path, step: int) -> None:
    """`copy` becomes `run_dir` as it was when it stopped after `step`: its checkpoint, its log, nothing later."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "export", ignore_errors=True)
    for checkpoint in (copy / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    kept = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
