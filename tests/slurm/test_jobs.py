"""The shipped sbatch scripts on a real two-node SLURM cluster (tests/slurm/conftest.py), submitted as users submit
them, with command-line overrides only: training preempted by a signal to every process of the job step (ranks,
launchers, forkservers, decoding workers), exits 75, is requeued and ends as an uninterrupted run; a bank job
killed and requeued ends with the same bank; a continual run across a preemption; an evaluation.

Training and the continual run take two nodes, one rank each; the bank and the evaluation one node, as their
scripts do by default. Models are tiny; uninterrupted references run beside the jobs, outside SLURM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.shard_jobs import JOB_NAME, is_complete, shard_ranges
from data.shards import MANIFEST_NAME, shard_name
from tests.conftest import ROOT, assert_ok, child_env, launch_command, read_metrics
from tests.core.test_train_distributed import assert_identical_runs
from tests.slurm.conftest import ENDED, ONE_GPU, Cluster, Job

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one cluster for all
STEPS = 80  # tiny steps take ~25 ms: a signal at step 3 lands well inside training


def start_local(script: str, args: list[str], num_procs: int = 1) -> subprocess.Popen:
    """An uninterrupted reference, started outside SLURM (torchrun on the CPU), running beside the jobs."""
    command = [sys.executable] if num_procs == 1 else launch_command("torchrun", num_procs)
    return subprocess.Popen([*command, f"launch/{script}", *args], env=child_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    output = proc.communicate(timeout=timeout)[0]
    assert_ok(subprocess.CompletedProcess(proc.args, proc.returncode, output, ""))


def last_logged_step(metrics: Path) -> int:
    """The last complete line of a metrics log that may be written as it is read."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def preempt_when_logged(slurm: Cluster, jobs: list[tuple[Job, Path]], step: int, timeout: float = 300) -> None:
    """Signals each job (USR1 to every process of its steps) once its metrics log reached `step`."""
    pending, deadline, polls = list(jobs), time.time() + timeout, 0
    while pending and time.time() < deadline:
        for job, metrics in list(pending):
            if last_logged_step(metrics) >= step:
                slurm.signal(job, "USR1")
                pending.remove((job, metrics))
            elif polls % 10 == 0 and slurm.info(job)["JobState"] in ENDED:  # asking scontrol once a second will do
                pytest.fail(f"job {job.id} ended before it was preempted:\n{job.text()[-3000:]}")
        polls += 1
        time.sleep(0.1)
    assert not pending, f"no job reached step {step} within {timeout}s"


def assert_requeued_once(info: dict[str, str], job: Job) -> str:
    output = job.text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    return output


def assert_each_rank_named_itself(output: str) -> None:
    """Every rank that reported the preemption gave its own rank (under srun: SLURM_PROCID, known before RANK is)."""
    ranks = re.findall(r"rank (\d+): preempted: saved the checkpoint of step", output)
    assert ranks and len(ranks) == len(set(ranks)) and set(ranks) <= {"0", "1"}, output[-3000:]


# --- training ------------------------------------------------------------------------------------------------


def train_overrides(tiny: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.pretrained={tiny['pretrained']}", "model.num_classes=4", f"data.target={tiny['target']}",
        f"data.bank={tiny['bank']}", f"run.dir={run_dir}", f"train.steps={STEPS}", "run.log_every=1",
        "run.ckpt_every=1000", "debug.sample_ledger=true", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def preempted_training(slurm, tiny, tmp_path_factory) -> dict:
    """train.sbatch on 2 nodes under both launchers at once, with decoding workers (2 per rank under srun, 1 under
    the deepspeed launcher), preempted by
    `scancel --signal=USR1` once training runs; the uninterrupted reference (no workers) runs beside them."""
    root = tmp_path_factory.mktemp("slurm_train")
    reference = start_local("train.py", ["--config", "tiny_cpu", *train_overrides(tiny, root / "reference")], 2)
    jobs = {}
    for launcher, workers in (("srun", 2), ("deepspeed", 1)):  # each worker imports torch: one is enough there
        run = root / launcher / "run"
        job = slurm.submit("train.sbatch", train_overrides(tiny, run, f"data.num_workers={workers}"), root / launcher,
                           CONFIG="tiny_cpu", LAUNCHER=launcher)  # fmt: skip
        jobs[launcher] = (job, run)
    preempt_when_logged(slurm, [(job, run / "metrics.jsonl") for job, run in jobs.values()], step=3)
    ended = {launcher: (job, run, slurm.wait(job)) for launcher, (job, run) in jobs.items()}
    finish(reference)
    return {"reference": root / "reference", "jobs": ended}


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_training_preempted_on_two_nodes_is_requeued_and_ends_as_an_uninterrupted_run(preempted_training, launcher):
    job, run, info = preempted_training["jobs"][launcher]
    output = assert_requeued_once(info, job)
    assert "Exited with exit code 75" in output  # srun's report of the preempted step
    assert_each_rank_named_itself(output)
    assert "exited unexpectedly" not in output  # the decoding workers survived the signal
    saved = re.search(r"saved the checkpoint of step (\d+)", output)
    assert 3 <= int(saved.group(1)) < STEPS
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))  # each step logged once
    assert_identical_runs(run, preempted_training["reference"])  # weights within 1e-6, the same samples consumed
    assert not (run.parent / "preempted").exists()  # the script removed the ranks' marker when it requeued


# --- the memory bank -------------------------------------------------------------------------------------------

# 11 shards of 3 with 40 DDIM steps: about a second a shard, so that the job is killed between two shards.
BANK = ("bank.num_samples=32", "bank.samples_per_shard=3", "bank.batch_size=2", "bank.num_steps=40", "bank.preview=4")


def bank_files(directory: Path) -> dict[str, bytes]:
    """What a reader depends on: every shard, the manifest and the job record."""
    names = [shard_name(j) for j in range(len(shard_ranges(32, 3)))] + [MANIFEST_NAME, JOB_NAME]
    return {name: (directory / name).read_bytes() for name in names}


def test_a_bank_job_killed_and_requeued_ends_with_the_same_bank(slurm, tiny, tmp_path):
    reference = start_local("generate_bank.py", ["--config", "tiny_cpu", f"model.pretrained={tiny['pretrained']}",
                                                 f"data.bank={tmp_path / 'reference'}", *BANK])  # fmt: skip
    bank = tmp_path / "bank"
    job = slurm.submit("generate_bank.sbatch", [f"model.pretrained={tiny['pretrained']}", f"data.bank={bank}", *BANK],
                       tmp_path / "job", options=ONE_GPU, CONFIG="tiny_cpu")  # fmt: skip
    ranges = shard_ranges(32, 3)
    deadline, polls = time.time() + 300, 0
    while not any(is_complete(bank, j, r) for j, r in enumerate(ranges)):
        assert time.time() < deadline and (polls % 10 or slurm.info(job)["JobState"] not in ENDED), job.text()[-3000:]
        polls += 1
        time.sleep(0.1)
    slurm.run("scontrol", "requeue", job.id)  # what a preemption with PreemptMode=REQUEUE does: kill, requeue
    output = assert_requeued_once(slurm.wait(job), job)
    kept = [int(n) for n in re.findall(r"\((\d+) already complete\)", output)]
    assert len(kept) == 1 and 0 < kept[0] < 32, output[-3000:]  # the rerun kept what the killed run finished
    finish(reference)
    assert bank_files(bank) == bank_files(tmp_path / "reference")


# --- a continual run --------------------------------------------------------------------------------------------


def test_a_continual_run_across_a_preemption(slurm, tiny, tmp_path):
    from tests.continual.test_continual import named_shards

    stages = [
        {"target": str(named_shards(tmp_path / f"target{k}", 16, classes, seed=10 + k)), "steps": steps}
        for k, (classes, steps) in enumerate([(["a", "b"], STEPS), (["b", "c"], 2)])
    ]
    document = {
        "pretrained": str(tiny["pretrained"]), "config": "tiny_cpu", "mode": "evolving",
        "overrides": ["run.ckpt_every=1000", "run.log_every=1", "bank.num_steps=2", "bank.batch_size=4",
                      "bank.samples_per_shard=4", "bank.preview=0"],
        "bank": {"size": 8, "keep": 0.5, "seed": 0},
        "stages": stages,
    }  # fmt: skip
    run_dir, stages_file = tmp_path / "run", tmp_path / "stages.yaml"
    stages_file.write_text(json.dumps(document))  # JSON is YAML
    job = slurm.submit("continual.sbatch", [f"run_dir={run_dir}"], tmp_path / "job", STAGES=str(stages_file))
    preempt_when_logged(slurm, [(job, run_dir / "stage_01" / "train" / "metrics.jsonl")], step=3)
    output = assert_requeued_once(slurm.wait(job), job)
    assert_each_rank_named_itself(output)
    for k in (1, 2):
        assert (run_dir / f"stage_{k:02d}" / "done.json").is_file()
    logged = [json.loads(line)["step"] for line in (run_dir / "stage_01" / "train" / "metrics.jsonl").open()]
    assert logged == list(range(1, STEPS + 1))  # resumed from the preemption's checkpoint: each step once


# --- an evaluation ----------------------------------------------------------------------------------------------


def test_an_evaluation_job_runs(slurm, tiny, tmp_path):
    import torch

    from models.feature_net import FeatureNet, save_feature_net

    torch.manual_seed(0)
    save_feature_net(FeatureNet(num_features=16, width=8), tmp_path / "feature_net.pt")
    out = tmp_path / "eval"
    args = [
        f"eval.model={tiny['pretrained']}", f"eval.reference={tiny['target']}",
        f"eval.feature_net={tmp_path / 'feature_net.pt'}", f"eval.out={out}", f"eval.cache={tmp_path / 'cache'}",
        "eval.num_samples=8", "eval.samples_per_shard=2", "eval.batch_size=2", "eval.sample_steps=2",
        "eval.kid_subsets=2", "eval.grid_images=0",
    ]  # fmt: skip
    job = slurm.submit("evaluate.sbatch", args, tmp_path / "job", options=ONE_GPU, CONFIG="tiny_cpu")
    info = slurm.wait(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-4000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert results and "samples: 8 sampled (0 already complete)" in job.text()
