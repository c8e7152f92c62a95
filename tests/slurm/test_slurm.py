"""The sbatch templates parse, and their dry run prints the commands a SLURM allocation would run."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = ["launch/slurm/train.sbatch", "launch/slurm/generate_bank.sbatch", "launch/slurm/common.sh"]
ALLOCATION = {"SLURM_JOB_NODELIST": "gpu01,gpu02", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "4"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def dry_run(script: str, *args: str, expect: int = 0, **env: str) -> str:
    env = {**os.environ, **ALLOCATION, "DRY_RUN": "1", "CONFIG": "dit_xl2_paper", **env}
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == expect, proc.stderr
    return proc.stdout


def test_train_dry_run_with_srun():
    out = dry_run("launch/slurm/train.sbatch", "model.pretrained=/models/dit", "run.dir=/runs/a")
    assert "# rendezvous: MASTER_ADDR=gpu01 MASTER_PORT=24242" in out
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=4 python launch/train.py --resume --config dit_xl2_paper " \
           "model.pretrained=/models/dit run.dir=/runs/a" in out  # fmt: skip


def test_preempted_training_is_requeued():
    out = dry_run("launch/slurm/train.sbatch", "run.dir=/runs/a", DRY_RUN_STATUS="75")
    assert "scontrol requeue 4242" in out
    failed = dry_run("launch/slurm/train.sbatch", "run.dir=/runs/a", expect=1, DRY_RUN_STATUS="1")
    assert "launch/train.py" in failed and "scontrol requeue" not in failed  # a failure is not requeued


def test_bank_dry_run_with_the_deepspeed_launcher():
    out = dry_run("launch/slurm/generate_bank.sbatch", "data.bank=/shards/bank", LAUNCHER="deepspeed")
    assert "# hostfile: gpu01 slots=4\n# hostfile: gpu02 slots=4" in out
    assert "deepspeed --hostfile hostfile.4242 --master_addr gpu01 --master_port 24242 launch/generate_bank.py" in out


def test_train_script_requires_a_config():
    env = {**os.environ, **ALLOCATION, "DRY_RUN": "1"}
    env.pop("CONFIG", None)
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set CONFIG" in proc.stderr
