"""The sbatch templates parse, and their dry run prints the commands a SLURM allocation would run, also where
`scontrol` is installed but no cluster is configured; the rank and device a task takes under srun."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import ROOT
from trainer.distributed import device_ordinal, launcher_rank

SCRIPTS = [
    "launch/slurm/train.sbatch", "launch/slurm/generate_bank.sbatch", "launch/slurm/continual.sbatch",
    "launch/slurm/evaluate.sbatch", "launch/slurm/common.sh",
]  # fmt: skip
ALLOCATION = {"SLURM_JOB_NODELIST": "gpu01,gpu02", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "4",
              "SLURM_CPUS_ON_NODE": "32"}  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def dry_run(script: str, *args: str, expect: int = 0, path: str | None = None, **env: str) -> str:
    unset = ("MASTER_ADDR", "MASTER_PORT", "PREEMPTED_FILE", "HOSTFILE", "CPUS_PER_TASK", "LAUNCHER")
    inherited = {key: value for key, value in os.environ.items() if key not in unset}
    env = {**inherited, **ALLOCATION, "DRY_RUN": "1", "CONFIG": "dit_xl2_paper", **env}
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == expect, proc.stderr
    return proc.stdout


def test_train_dry_run_with_srun():
    out = dry_run("launch/slurm/train.sbatch", "model.pretrained=/models/dit", "run.dir=/runs/a")
    assert "# rendezvous: MASTER_ADDR=gpu01 MASTER_PORT=24242" in out
    # Each of the 4 tasks of a node gets its share of the node's 32 CPUs (its workers and threads need them).
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=4 --cpus-per-task=8 python launch/train.py --resume " \
           "--config dit_xl2_paper model.pretrained=/models/dit run.dir=/runs/a" in out  # fmt: skip


def test_a_cluster_less_scontrol_falls_back_to_the_node_list(tmp_path):
    """scontrol installed where no cluster is configured fails (or prints nothing): the list is split as it is."""
    for name, body in (("fails", "echo 'fatal: Could not establish a configuration source' >&2; exit 1"),
                       ("silent", "exit 0")):  # fmt: skip
        bin_dir = tmp_path / name
        bin_dir.mkdir()
        fake = bin_dir / "scontrol"
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        out = dry_run("launch/slurm/train.sbatch", "run.dir=/runs/a", path=f"{bin_dir}:{os.environ['PATH']}")
        assert "# rendezvous: MASTER_ADDR=gpu01 MASTER_PORT=24242" in out
        bank = dry_run("launch/slurm/generate_bank.sbatch", path=f"{bin_dir}:{os.environ['PATH']}",
                       LAUNCHER="deepspeed")  # fmt: skip
        assert "# hostfile: gpu01 slots=4\n# hostfile: gpu02 slots=4" in bank


def test_preempted_training_is_requeued(tmp_path):
    out = dry_run("launch/slurm/train.sbatch", "run.dir=/runs/a", DRY_RUN_STATUS="75")
    assert "scontrol requeue 4242" in out
    failed = dry_run("launch/slurm/train.sbatch", "run.dir=/runs/a", expect=1, DRY_RUN_STATUS="1")
    assert "launch/train.py" in failed and "scontrol requeue" not in failed  # a failure is not requeued


def test_the_requeue_follows_the_ranks_marker_not_only_sruns_status(tmp_path):
    """Under --kill-on-bad-exit srun may report the status of a rank it killed; the ranks' marker decides. A marker
    left by an earlier run of the job is removed before the ranks start."""
    marker = tmp_path / "preempted"
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text(f'#!/bin/sh\n[ "$MARK" = 1 ] && touch {marker}\nexit 137\n')  # killed by srun: 128 + 9
    fake_srun.chmod(0o755)
    fake_scontrol = tmp_path / "bin" / "scontrol"
    fake_scontrol.write_text(f'#!/bin/sh\necho "scontrol $*" >> {tmp_path}/calls\n')
    fake_scontrol.chmod(0o755)
    env = {**os.environ, **ALLOCATION, "CONFIG": "dit_xl2_paper", "PREEMPTED_FILE": str(marker), "MASTER_PORT": "1",
           "PATH": f"{fake_srun.parent}:{os.environ['PATH']}"}  # fmt: skip
    for script in ("train.sbatch", "continual.sbatch"):
        for mark, requeued in (("1", True), ("0", False)):
            marker.write_text("")  # an earlier run's
            (tmp_path / "calls").unlink(missing_ok=True)
            proc = subprocess.run(["bash", str(ROOT / "launch/slurm" / script)], cwd=ROOT, capture_output=True,
                                  text=True, env={**env, "MARK": mark, "STAGES": "s.yaml"})  # fmt: skip
            calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
            assert ("scontrol requeue 4242" in calls) == requeued, (script, mark, proc.stderr)
            assert proc.returncode == (0 if requeued else 137)
            assert not marker.exists()  # removed: the next run of the job starts without it


def test_bank_dry_run_with_the_deepspeed_launcher():
    out = dry_run("launch/slurm/generate_bank.sbatch", "data.bank=/shards/bank", LAUNCHER="deepspeed")
    assert "# hostfile: gpu01 slots=4\n# hostfile: gpu02 slots=4" in out
    # One launcher per node, started by srun with the node's CPUs; it runs the node's 4 ranks.
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=32 bash -c" in out
    assert r"trap\ \"\"\ USR1\;\ exec\ deepspeed\ --no_ssh\ --node_rank=\"\$SLURM_NODEID\"" in out
    assert "--hostfile hostfile.4242 --master_addr gpu01 --master_port 24242 launch/generate_bank.py" in out


def test_train_script_requires_a_config():
    env = {**os.environ, **ALLOCATION, "DRY_RUN": "1"}
    env.pop("CONFIG", None)
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set CONFIG" in proc.stderr


def test_a_task_bound_to_one_gpu_uses_device_0():
    assert device_ordinal(3, "3") == 0  # srun --gpu-bind / --gpus-per-task=1: the task sees only its own GPU
    assert device_ordinal(3, " 5 ") == 0
    assert device_ordinal(3, "0,1,2,3,4,5,6,7") == 3  # the node's GPUs visible (deepspeed's launcher, plain srun)
    assert device_ordinal(3, None) == 3  # nothing narrowed: every GPU visible
    assert device_ordinal(0, "GPU-8e1f0c2a") == 0


def test_the_rank_under_srun_is_known_before_the_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert launcher_rank() == 5
    monkeypatch.setenv("RANK", "2")  # a launcher that sets RANK (deepspeed, torchrun) is believed first
    assert launcher_rank() == 2
