"""Shared fixtures: tiny models and shard sets on disk, and a launcher for real multi-process runs."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import make_shards, make_tiny_dit

ROOT = Path(__file__).resolve().parent.parent
TEST_DEVICES = ("cpu", "cuda")


def requested_test_device(environ: Mapping[str, str] = os.environ) -> str:
    """Where the tests train: the CPU (DeepSpeed's CPU accelerator, gloo) unless DIFFTUNE_TEST_DEVICE=cuda or
    DS_ACCELERATOR=cuda asks for the GPU, as `launch/gpu_check.py` does; then DeepSpeed picks CUDA itself."""
    asked = environ.get("DIFFTUNE_TEST_DEVICE") or ("cuda" if environ.get("DS_ACCELERATOR") == "cuda" else "cpu")
    if asked not in TEST_DEVICES:
        raise ValueError(f"DIFFTUNE_TEST_DEVICE={asked!r} is not one of {TEST_DEVICES}")
    return asked


TEST_DEVICE = requested_test_device()
if TEST_DEVICE == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config) -> None:
    import torch

    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("the tests were asked to run on CUDA (DIFFTUNE_TEST_DEVICE or DS_ACCELERATOR), but "
                                "torch sees no CUDA device; unset both to run them on the CPU")  # fmt: skip


def pytest_report_header(config) -> str:
    if TEST_DEVICE == "cpu":
        return f"test device: cpu (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')})"
    import torch

    # The count only: naming the device would create a CUDA context in this process before tests fork.
    return f"test device: cuda ({torch.cuda.device_count()} visible)"


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
    return make_tiny_set(tmp_path_factory.mktemp("tiny"))


def make_tiny_set(root: Path) -> dict[str, Path]:
    """The `tiny` fixture's folders, made in `root` (also used by launch/gpu_check.py)."""
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
    in this process (a child would try to bind this process's port). On the CPU DeepSpeed is told so; on CUDA
    it is left to pick the GPU, as it does for users."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if TEST_DEVICE == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_entry(script: str, args: list[str], num_procs: int = 1, **options: Any) -> subprocess.CompletedProcess:
    """Runs `launch/<script>` as users do (run_script's other options: timeout, env, launcher)."""
    return run_script(ROOT / "launch" / script, args, num_procs, **options)


def run_script(
    script: Path,
    args: list[str],
    num_procs: int = 1,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    launcher: str = "torchrun",
) -> subprocess.CompletedProcess:
    """Runs a script as one plain process, or as N ranks (CPU ranks, or one GPU each) started by
    torchrun or, with launcher="deepspeed", by `deepspeed --num_gpus N`. Both run the same script under the same
    engine; torchrun starts in a third of the time (the deepspeed launcher is two Python processes importing
    DeepSpeed before any rank starts), so the tests of the deepspeed launcher itself ask for it by name.
    `env` adds to the child's environment. On timeout the whole process group is killed, ranks included."""
    if TEST_DEVICE == "cuda":
        import torch

        if num_procs > torch.cuda.device_count():  # NCCL refuses two ranks on one GPU
            pytest.skip(f"{num_procs} ranks on CUDA need {num_procs} GPUs; {torch.cuda.device_count()} visible")
    env = {**child_env(), **(env or {})}
    command = [sys.executable] if num_procs == 1 else launch_command(launcher, num_procs)
    with subprocess.Popen(
        [*command, str(script), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so that a timeout takes the ranks down with it
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # a timeout, or the tests interrupted
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_here(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """`launch/<script>`'s main in this process, one rank, its stdout and stderr captured: for what a job refuses
    (a named input, exit status 2), which needs no process of its own (starting one costs ~8 s of imports)."""
    main = importlib.import_module(f"launch.{script.removesuffix('.py')}").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())


def launch_command(launcher: str, num_procs: int) -> list[str]:
    """The command that starts `num_procs` local ranks of a script given after it. Through this interpreter
    (`-m`, not the launcher's script and its shebang), so that every rank runs the tests' Python: the same venv
    prefix, hence the same build of DeepSpeed's CPU communication op (another prefix recompiles it, ~50 s)."""
    port = ["--master_port", str(free_port())]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_procs), *port]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), *port]
    raise ValueError(f"launcher={launcher!r} is not torchrun or deepspeed")


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
