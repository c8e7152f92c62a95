"""A real two-node SLURM cluster on this machine (tests/slurm/cluster.sh), started once per test session for the
tests that submit the shipped sbatch scripts, and stopped at its end.

It needs root and Debian's slurm-wlm and munge (`make slurm` installs them). Where they are missing the tests
that use the cluster are skipped, saying so; in CI (CI=true) they fail instead, so that CI never passes without them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, free_port

CLUSTER_SCRIPT = Path(__file__).with_name("cluster.sh")
DEFAULT_PORT = 16817  # slurmctld; the nodes n1 and n2 listen on the next two
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Each node of a test job: one fake GPU and one CPU, so that two jobs run side by side on the two nodes.
ONE_GPU_PER_NODE = ("--nodes=2", "--gpus-per-node=1", "--cpus-per-gpu=1")
ONE_GPU = ("--nodes=1", "--gpus-per-node=1", "--cpus-per-gpu=1")


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "the cluster needs root (its daemons, device nodes and /etc/hosts entries)"
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed: `make slurm` installs Debian's slurm-wlm and munge (as root)"
    return None


def ports_free(base: int) -> bool:
    for port in range(base, base + 3):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@dataclass
class Job:
    id: str
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


class Cluster:
    """Submits the shipped sbatch scripts as a user would (from the repository root, command-line overrides only)
    and follows their jobs with scontrol (no accounting: sacct has nothing)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.conf = directory / "slurm.conf"
        # The scripts run `python` and `deepspeed` from PATH: this venv's, and nothing else of its bin/ (its ninja
        # would shadow the system's, and DeepSpeed's compiled ops would be rebuilt by every job and every test).
        self.bin = directory / "bin"
        self.bin.mkdir(exist_ok=True)
        deepspeed = f"{sys.executable} -m deepspeed.launcher.runner"
        for name, target in (("python", sys.executable), ("deepspeed", deepspeed)):
            (self.bin / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')  # a symlink would leave the venv
            (self.bin / name).chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        """A job's environment (sbatch passes the submitter's on): this venv's python, one thread per process."""
        return {
            **child_env(),
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "MASTER_PORT": str(free_port()),  # not the script's 20000 + job id: another session's cluster may use it
            **extra,
        }

    def run(self, *command: str) -> str:
        proc = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(command)}: {proc.stderr}"
        return proc.stdout

    def submit(self, script: str, args: list[str], out: Path, options=ONE_GPU_PER_NODE, **env: str) -> Job:
        out.mkdir(parents=True, exist_ok=True)
        env.setdefault("PREEMPTED_FILE", str(out / "preempted"))
        env.setdefault("HOSTFILE", str(out / "hostfile"))
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--output={out}/job-%j.out", *options, f"launch/slurm/{script}", *args],
            env=self.env(**env), cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().split(";")[0]
        return Job(job_id, out / f"job-{job_id}.out")

    def info(self, job: Job) -> dict[str, str]:
        """The job's fields (JobState, Restarts, ExitCode, ...) from `scontrol show job`."""
        line = self.run("scontrol", "show", "job", "--oneliner", job.id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job: Job, timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info(job)
            if info["JobState"] in ENDED:
                return info
            time.sleep(0.5)
        self.run("scancel", job.id)
        raise TimeoutError(f"job {job.id} did not end within {timeout}s\n{job.text()[-3000:]}")

    def signal(self, job: Job, name: str = "USR1") -> None:
        """Signals every process of the job's steps (ranks, launchers, forkservers, workers), as a preemption."""
        self.run("scancel", f"--signal={name}", job.id)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Cluster:
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM tests must run in CI: {reason}")
        pytest.skip(f"no SLURM cluster here: {reason}")
    directory = tmp_path_factory.mktemp("slurm")
    # Another session's cluster may hold the default ports: then take free ones.
    base = DEFAULT_PORT if ports_free(DEFAULT_PORT) else next(p for p in range(17000, 30000, 3) if ports_free(p))
    env = {**os.environ, "PORT_BASE": str(base)}
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(directory)], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], timeout=60)
        pytest.fail(f"the SLURM cluster did not start:\n{started.stdout}\n{started.stderr}")
    try:
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], timeout=60)
