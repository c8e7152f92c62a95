"""End-to-end training under DeepSpeed on the CPU with real processes (gloo): one run per (ranks, ZeRO stage),
shared by the tests that compare it with another launch of the same plan: more ranks, a resume on the same or
another number of ranks, two nodes, a resume with another plan."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from tests.conftest import (
    ROOT,
    assert_ok,
    child_env,
    copy_as_stopped_after,
    free_port,
    read_metrics,
    run_entry,
    run_here,
    train_args,
)

pytestmark = pytest.mark.slow


def exported(run_dir, which: str) -> dict[str, torch.Tensor]:
    return DiTTransformer2DModel.from_pretrained(run_dir / "export" / which / "transformer").state_dict()


# Attention's key bias has a gradient of exactly zero (a softmax is invariant to adding q.b to every score of a
# query), so what it gets is rounding noise that Adam scales to lr-sized steps: it differs between two reduction
# orders by design and changes no output. The losses, which it cannot affect, are compared instead.
NOISE_ONLY = ".to_k.bias"


def assert_same_run(a, b, steps=None, rtol=1e-5):
    la, lb = read_metrics(a), read_metrics(b)
    if steps is not None:
        la, lb = [m for m in la if m["step"] in steps], [m for m in lb if m["step"] in steps]
    assert [m["step"] for m in la] == [m["step"] for m in lb] and la
    np.testing.assert_allclose([m["loss/total"] for m in la], [m["loss/total"] for m in lb], rtol=rtol)
    for which in ("raw", "ema"):
        wa, wb = exported(a, which), exported(b, which)
        assert wa.keys() == wb.keys()
        for key in (k for k in wa if not k.endswith(NOISE_ONLY)):
            torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=1e-7, msg=f"{which}: {key}")


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


# 6 steps of global batch 8 (2 ranks x micro 4, or 1 rank x micro 4 x accumulation 2), saved at 3 and 6.
PLAN = ("train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=6", "run.ckpt_every=3",
        "debug.sample_ledger=true")  # fmt: skip


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """`straight(ranks, zero_stage)`: the uninterrupted run of PLAN, made once. ZeRO-0 and ZeRO-2 agree to rounding
    on one rank, ZeRO-3 does not (see NOISE_ONLY: its reduction order differs)."""
    runs = {}

    def run(ranks: int, zero_stage: int) -> Path:
        if (ranks, zero_stage) not in runs:
            path = tmp_path_factory.mktemp("straight") / f"ranks{ranks}_zero{zero_stage}"
            overrides = (*PLAN, f"train.zero_stage={zero_stage}")
            assert_ok(run_entry("train.py", train_args(tiny, path, *overrides), num_procs=ranks))
            runs[ranks, zero_stage] = path
        return runs[ranks, zero_stage]

    return run


def resumed_from_step_3(tiny, straight_run: Path, copy: Path, ranks: int, zero_stage: int) -> Path:
    """`straight_run` rewound to its step-3 checkpoint, resumed on `ranks` ranks to the end."""
    copy_as_stopped_after(straight_run, copy, 3)
    args = train_args(tiny, copy, *PLAN, f"train.zero_stage={zero_stage}") + ["--resume"]
    assert_ok(run_entry("train.py", args, num_procs=ranks))
    return copy


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_global_batch_invariance(tiny, straight, zero_stage):
    """2 ranks x micro 4 x accumulation 1 == 1 rank x micro 4 x accumulation 2, over 6 steps."""
    reference = straight(1, 3 if zero_stage == 3 else 2)
    assert_same_run(straight(2, zero_stage), reference)
    losses = [m["loss/total"] for m in read_metrics(reference)]
    assert len(set(losses)) == len(losses)  # the weights did change from step to step
    before = DiTTransformer2DModel.from_pretrained(tiny["pretrained"] / "transformer").state_dict()
    after = exported(reference, "raw")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after and before[k].shape == after[k].shape)


def test_resume_continues_exactly(tiny, tmp_path, straight):
    """The 2-rank ZeRO-2 run rewound to its step-3 checkpoint, --resume, 3 more == straight: weights, EMA and
    losses; the log keeps each step once although it held steps 4-6 when it was rewound."""
    reference = straight(2, 2)
    copy_as_stopped_after(reference, tmp_path / "resumed", 3)
    shutil.copy(reference / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")  # as if it logged 4-6 and died
    args = train_args(tiny, tmp_path / "resumed", *PLAN, "train.zero_stage=2") + ["--resume"]
    assert_ok(run_entry("train.py", args, num_procs=2))
    assert_same_run(reference, tmp_path / "resumed", steps={4, 5, 6}, rtol=1e-6)
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_elastic_resume(tiny, tmp_path, straight, first, second):
    """A run on `first` ranks, rewound to its step-3 checkpoint and resumed on `second` ranks, ends as it did."""
    elastic = resumed_from_step_3(tiny, straight(first, 2), tmp_path / "elastic", second, 2)
    assert (elastic / "checkpoints" / "step_00000003_universal").is_dir()
    assert_identical_runs(elastic, straight(first, 2), rtol=1e-5)


def test_resume_with_another_global_batch_is_refused(tiny, tmp_path, straight):
    run = tmp_path / "run"
    shutil.copytree(straight(1, 2), run)
    args = train_args(tiny, run, *PLAN, "train.steps=8", "train.global_batch_size=4") + ["--resume"]
    proc = run_here("train.py", args)
    assert proc.returncode == 2
    assert "train.global_batch_size: 8 -> 4" in proc.stderr and "run.allow_plan_change=true" in proc.stderr


def test_two_nodes_started_like_slurm(tiny, tmp_path, straight):
    """Two separate launches (node rank 0 and 1, master on loopback) train and save as one job."""
    nodes, port = tmp_path / "nodes", free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
    args = ["launch/train.py", *train_args(tiny, nodes, *PLAN, "train.zero_stage=2")]
    procs = [
        subprocess.Popen(
            [*torchrun, "--node_rank", str(node), *args],
            env=child_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert len(list((nodes / "checkpoints" / "step_00000006").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert_identical_runs(nodes, straight(2, 2), rtol=1e-6)
