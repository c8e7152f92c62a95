"""Retention methods (method.retention): the KD loss against a hand computation on a tiny model, the refused
combinations, and a 2-rank ZeRO-2 Diff-Tuning-with-KD run through launch/train.py that resumes exactly and exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.batch import MicroBatch, load_micro_batch
from data.sampler import BANK, TARGET
from models.dit import DiTFamily
from tests.conftest import assert_ok, copy_as_stopped_after, read_metrics, run_entry, train_args
from tests.core.test_train_distributed import assert_same_run
from tests.tiny_sd import tiny_sd  # noqa: F401 (a session fixture)
from trainer.config import ConfigError, load_config
from trainer.host_reads import HostReadCounter
from trainer.loop import slot_losses
from trainer.loss import NoiseSchedule, diffusion_loss, source_weights
from trainer.retention import retention_method
from trainer.setup import build_planner, load_family, open_sources

NUM_CLASSES = 4


def kd_overrides(tiny) -> list[str]:
    return [f"model.pretrained={tiny['pretrained']}", f"model.num_classes={NUM_CLASSES}",
            f"data.target={tiny['target']}", "method.retention=kd"]  # fmt: skip


def micro_batch(sources: list[int], t: list[int], seed: int = 0) -> MicroBatch:
    generator = torch.Generator().manual_seed(seed)
    n = len(sources)
    x0 = torch.rand((n, 3, 8, 8), generator=generator) * 2 - 1
    is_kd = torch.tensor(sources) == BANK
    return MicroBatch(
        x0=x0, noise=torch.randn(x0.shape, generator=generator), t=torch.tensor(t),
        condition={"label": torch.tensor([1, 3, 0, 2, 1][:n])}, null_condition=is_kd, is_retention=is_kd,
        ids=np.stack([np.arange(n), np.array(sources), np.arange(n)], axis=1),
    )  # fmt: skip


def test_kd_loss_equals_a_hand_computation(tiny):
    """Target slots keep the pre-trained objective; KD slots get the MSE of the student's epsilon to the frozen
    pre-trained model's (null class of its own label space) plus that of the variance channels."""
    cfg = load_config("tiny_cpu", kd_overrides(tiny))
    retention = retention_method(cfg)
    retention.prepare(torch.device("cpu"), torch.float32, lambda: load_family(cfg, num_classes=0))
    student = DiTFamily.from_pretrained(str(tiny["pretrained"]), num_classes=NUM_CLASSES)
    schedule, process = NoiseSchedule(student.betas()), student.noise_process
    batch = micro_batch([BANK, TARGET, BANK, TARGET, TARGET], t=[3, 700, 40, 250, 999])
    kd_rows, target_rows = [0, 2], [1, 3, 4]

    # At the start the student is the pre-trained model: on the null condition the two predict the same.
    at_start = slot_losses(student, student.denoiser, batch, process, torch.float32, cfg.method, retention)
    torch.testing.assert_close(at_start[kd_rows], torch.zeros(2), atol=1e-10, rtol=0)

    with torch.no_grad():  # a student that has moved away from the pre-trained weights
        for parameter in student.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with HostReadCounter() as counter:  # which slots distil is known on the host: the step reads nothing back
        losses = slot_losses(student, student.denoiser, batch, process, torch.float32, cfg.method, retention)
    assert counter.take()[0] == {}

    teacher = DiTFamily.from_pretrained(str(tiny["pretrained"]))  # the released label space: null class 10
    assert teacher.null_condition == 10 and student.null_condition == NUM_CLASSES
    x_t = schedule.add_noise(batch.x0, batch.noise, batch.t)
    with torch.no_grad():
        mine = student.denoiser(x_t, timestep=batch.t, class_labels=torch.tensor([4, 3, 4, 2, 1])).sample
        theirs = teacher.denoiser(x_t[kd_rows], timestep=batch.t[kd_rows], class_labels=torch.tensor([10, 10])).sample
    for row, (i, expected) in enumerate(zip(kd_rows, theirs)):
        eps, variance = mine[i, :3], mine[i, 3:]
        by_hand = ((eps - expected[:3]) ** 2).mean() + ((variance - expected[3:]) ** 2).mean()
        torch.testing.assert_close(losses[i], by_hand, rtol=1e-5, atol=0, msg=f"KD slot {row}")
    objective = diffusion_loss(mine, batch.x0, x_t, batch.noise, batch.t, schedule)
    torch.testing.assert_close(losses[target_rows], objective[target_rows], rtol=1e-5, atol=0)
    assert (losses[kd_rows] > 0).all()

    # Weighted as the bank is: mean over the global target slots + kd_weight x mean over the global KD slots.
    weights = source_weights(batch.is_retention, 3, 2, retention.loss_weight)
    total = (losses * weights).sum()
    torch.testing.assert_close(total, losses[target_rows].mean() + 0.05 * losses[kd_rows].mean(), rtol=1e-6, atol=0)
    total.backward()  # the KD slots' loss reaches the student, never the frozen teacher
    assert all(p.grad is None for p in retention.teacher.denoiser.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.bank=/some/bank"], "method.retention=kd distils from the frozen model and reads no memory bank, but "
         "data.bank=/some/bank is set: remove it (data.bank=null)"),
        (["method.bank_ratio=0"], "method.retention=kd with method.bank_ratio=0 has no KD slots"),
        (["method.tau=0"], "method.retention=kd with method.tau=0 is plain fine-tuning (psi = 1, so xi = 1 - psi = 0)"),
        (["method.bank_loss_weight=0.1"], "method.bank_loss_weight=0.1 weights bank replay, which method.retention=kd "
         "does not run: weight the KD slots with method.kd_weight"),
        (["method.kd_weight=0"], "method.kd_weight=0.0 must be > 0"),
        (["train.zero_stage=3"], "method.retention=kd with train.zero_stage=3: the frozen teacher is a whole copy"),
        (["method.retention=ewc"], "method.retention='ewc' is not one of ('bank', 'kd')"),
    ],
)  # fmt: skip
def test_bad_kd_combinations_are_refused_with_the_reason(tiny, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", [*kd_overrides(tiny), *overrides])
    assert message in str(err.value)


def test_kd_zero2_resumes_exactly_and_exports(tiny, tmp_path):
    """4 steps straight (2 ranks, ZeRO-2, Diff-Tuning with KD, no bank) == the same run stopped at its step-2
    checkpoint and resumed; the export loads in diffusers; KD slots re-read target images at low t."""
    common = ("data.bank=null", "method.retention=kd", "train.zero_stage=2", "train.steps=4", "run.ckpt_every=2",
              "debug.sample_ledger=true")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_entry("train.py", train_args(tiny, straight, *common), num_procs=2))
    metrics = read_metrics(straight)
    assert all(m["loss/target"] > 0 and "loss/bank" not in m for m in metrics)
    # At step 1 the student is its teacher: the KD loss is 0 up to float rounding (exactly 0 on some machines);
    # once the student has moved, it is not.
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert 0 <= metrics[0]["loss/kd"] < 1e-6 and all(m["loss/kd"] > 1e-6 for m in metrics[1:])
    # Half the slots of every step are KD slots (method.bank_ratio=0.5), each an image of the 40 target ones.
    ledger = [json.loads(line) for rank in (0, 1) for line in (straight / "ledger" / f"rank{rank}.jsonl").open()]
    kd_slots = [entry for entry in ledger if entry["source"] == BANK]
    assert len(ledger) == 4 * 8 and len(kd_slots) == 4 * 4 and all(e["index"] < 40 for e in kd_slots)
    copy_as_stopped_after(straight, resumed, 2)
    assert_ok(run_entry("train.py", train_args(tiny, resumed, *common) + ["--resume"], num_procs=2))
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]
    assert_same_run(straight, resumed, steps={3, 4}, rtol=1e-6)


def test_kd_runs_through_the_family_interface_for_a_controlnet(tiny_sd):  # noqa: F811
    """The teacher is whatever the family builds from model.pretrained: for SD + ControlNet a second ControlNet
    (from the UNet) over a second frozen UNet. Equal to the student at the start, apart once the student moves."""
    cfg = load_config("tiny_sd_cpu", [f"model.pretrained={tiny_sd['pretrained']}", f"data.target={tiny_sd['target']}",
                                      "method.retention=kd"])  # fmt: skip
    retention = retention_method(cfg)
    student = load_family(cfg)
    student.place_frozen(torch.device("cpu"))
    retention.prepare(torch.device("cpu"), torch.float32, lambda: load_family(cfg, num_classes=0))
    sources = open_sources(cfg, student, retention)
    assert sources[BANK] is sources[TARGET]  # KD slots re-read the target set
    planner = build_planner(cfg, student, sources)
    plans = [planner.plan(step) for step in range(300)]  # KD slots draw t ~ xi: the low-noise end
    kd_t = np.concatenate([p.t[p.is_bank] for p in plans])
    target_t = np.concatenate([p.t[~p.is_bank] for p in plans])
    assert kd_t.mean() < 400 < 600 < target_t.mean()  # E[t] = T/3 under xi = 1 - t/T, 2T/3 under psi = t/T
    batch = load_micro_batch(planner.plan(0), np.arange(4), sources, student.condition_fields)
    kd_rows = np.flatnonzero(batch.ids[:, 1] == BANK)
    assert len(kd_rows) == 2 and batch.null_condition[kd_rows].all()
    process = student.noise_process
    losses = slot_losses(student, student.denoiser, batch, process, torch.float32, cfg.method, retention)
    torch.testing.assert_close(losses[kd_rows], torch.zeros(2), atol=1e-10, rtol=0)
    with torch.no_grad():
        for parameter in student.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    losses = slot_losses(student, student.denoiser, batch, process, torch.float32, cfg.method, retention)
    assert (losses[kd_rows] > 0).all() and torch.isfinite(losses).all()
