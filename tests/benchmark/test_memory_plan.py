"""The memory planner: exact model-state bytes by ZeRO stage, activations against tracked real tensors, the
plan against the real trainer's tracked peak, and the benchmark's entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from tests.conftest import assert_ok, run_entry, run_here
from tests.tiny import make_tiny_dit
from tests.tiny_sd import tiny_sd  # noqa: F401 (a session fixture)
from trainer.benchmark.memory_check import tracked_ranks
from trainer.benchmark.memory_plan import (
    CUDA_CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    NCCL_BUFFERS_GIB,
    activation_bytes,
    build_plan_model,
    fit_margin_bytes,
    plan_memory,
    plan_table,
)
from trainer.benchmark.memory_tracker import LiveTensorMemory
from trainer.config import load_config
from trainer.engine import ZERO_BUFFERS
from trainer.loss import NoiseSchedule, diffusion_loss
from trainer.setup import load_family

# Small enough for the CPU, big enough that activations are a real share of the bytes.
MEDIUM_DIT = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, in_channels=4, out_channels=8,
                  sample_size=16)  # fmt: skip


@pytest.fixture(scope="module")
def medium_dit(tmp_path_factory):
    return make_tiny_dit(tmp_path_factory.mktemp("medium") / "dit", num_classes=4, **MEDIUM_DIT)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_model_state_bytes_match_hand_count(tiny, zero_stage, precision):
    real = DiTTransformer2DModel.from_pretrained(tiny["pretrained"] / "transformer")
    n = sum(p.numel() for p in real.parameters())
    p = {"fp32": 4, "bf16": 2}[precision]
    buffers = sum(b.numel() for b in real.buffers()) * p
    world = 4
    plan = plan_memory(build_plan_model(str(tiny["pretrained"])), world_size=world, zero_stage=zero_stage,
                       precision=precision, micro_batch_size=2, checkpointing=False, activations=0)  # fmt: skip
    optimizer_shard = world if zero_stage >= 1 else 1
    assert plan.weights == p * n // (world if zero_stage == 3 else 1) + buffers
    assert plan.gradients == p * n // (world if zero_stage >= 2 else 1)
    # DeepSpeed keeps an fp32 master partition from ZeRO-1 on, in fp32 training too
    assert plan.master == (4 * n // optimizer_shard if zero_stage >= 1 or precision == "bf16" else 0)
    assert plan.optimizer == 8 * n // optimizer_shard
    assert plan.ema == 4 * n // optimizer_shard
    bucket = p * ZERO_BUFFERS["reduce_bucket_size"]  # the tiny model is smaller than every ZeRO_BUFFERS limit
    step_copy = 4 * n // world  # the step's fp32 flat copy of the rank's gradient partition
    gathered = p * n if zero_stage == 3 else 0  # ZeRO-3's gathered parameters, at most the whole model
    assert plan.buffers == (bucket + step_copy + gathered if zero_stage else 0)


def tracked_activations(folder, micro_batch: int, checkpointing: bool) -> int:
    """Bytes a real CPU forward leaves alive for the backward (model and inputs excluded), by the live tracker."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel.from_pretrained(folder / "transformer").train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    schedule = NoiseSchedule(np.linspace(1e-4, 0.02, 1000))
    x0, t = torch.randn(micro_batch, 4, 16, 16), torch.randint(0, 1000, (micro_batch,))
    noise, labels = torch.randn_like(x0), torch.randint(0, 4, (micro_batch,))
    tracker = LiveTensorMemory()
    with tracker:
        for p in model.parameters():
            tracker._see(p)
        x_t = schedule.add_noise(x0, noise, t)
        before = tracker.current
        output = model(x_t, timestep=t, class_labels=labels).sample
        retained = tracker.current - before
        diffusion_loss(output, x0, x_t, noise, t, schedule).mean().backward()
    return retained


def test_activation_estimate_matches_tracked_forward(medium_dit):
    planned = activation_bytes(build_plan_model(str(medium_dit)), 8, "fp32", checkpointing=False)
    measured = tracked_activations(medium_dit, 8, checkpointing=False)
    assert abs(planned / measured - 1) < 0.10, (planned, measured)


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block(medium_dit):
    model = build_plan_model(str(medium_dit))
    whole = activation_bytes(model, 8, "fp32", checkpointing=False)
    checkpointed = activation_bytes(model, 8, "fp32", checkpointing=True)
    kept = tracked_activations(medium_dit, 8, checkpointing=True)
    # the plan adds the recomputed block to what the forward keeps; both stay below no checkpointing
    assert kept < checkpointed < whole


def test_plan_answers_the_fit_question_for_dit_xl2():
    text, rows = plan_table("dit-xl2", world_size=8, zero_stages=[2, 3], precision="bf16", micro_batch_size=64,
                            checkpointing=[False, True], gpu_memory_gb=80)  # fmt: skip
    assert len(rows) == 4 and "749.8M trained parameters" in text and "margin" in text
    for row in rows:
        # the reserve: CUDA context and NCCL buffers (8 ranks), plus fragmentation as a share of the total
        reserve = CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB + FRAGMENTATION * row["total_gib"]
        assert row["margin_gib"] == pytest.approx(80 - row["total_gib"] - reserve)
        assert row["fits"] == (row["margin_gib"] >= 0) and f"{row['margin_gib']:8.2f}" in text
        assert row["optimizer_gib"] == pytest.approx(8 * 749_826_464 / 8 / 2**30)
    by_key = {(r["zero_stage"], r["checkpointing"]): r for r in rows}
    assert by_key[(3, False)]["weights_gib"] < by_key[(2, False)]["weights_gib"]
    assert by_key[(2, True)]["activations_gib"] < by_key[(2, False)]["activations_gib"] / 5


def test_fit_reserves_the_cuda_context_nccl_and_fragmentation():
    total = 72 * GIB  # under 80 GiB, but not with 1 + 0.5 GiB and 10% of 72 GiB on top
    assert fit_margin_bytes(total, 8, 80) / GIB == pytest.approx(80 - 72 - 1.5 - 7.2)
    assert fit_margin_bytes(total, 8, 80) < 0 < fit_margin_bytes(total, 8, 81)
    one_rank = fit_margin_bytes(total, 1, 80) - fit_margin_bytes(total, 8, 80)
    assert one_rank == NCCL_BUFFERS_GIB * GIB  # no NCCL buffers without a second rank


def test_plan_checkpoints_what_the_trainer_checkpoints(tiny_sd):  # noqa: F811
    """SD + ControlNet: train.activation_checkpointing recomputes the ControlNet, not the frozen UNet the gradients
    flow through; the plan applies the trainer's own rule, so the UNet's activations stay in the checkpointed plan."""
    cfg = load_config("tiny_sd_cpu", [f"model.pretrained={tiny_sd['pretrained']}", f"data.target={tiny_sd['target']}",
                                      "train.activation_checkpointing=true"])  # fmt: skip
    family = load_family(cfg, training=True)
    trainer_checkpoints = [type(m).__name__ for m in (family.denoiser, family.unet) if m.is_gradient_checkpointing]
    model = build_plan_model(str(tiny_sd["pretrained"]))
    whole = activation_bytes(model, 4, "fp32", checkpointing=False)
    checkpointed = activation_bytes(model, 4, "fp32", checkpointing=True)
    plan_checkpoints = [type(m).__name__ for m in (model.trained, model.frozen[0]) if m.is_gradient_checkpointing]
    assert trainer_checkpoints == plan_checkpoints == ["ControlNetModel"]
    assert checkpointed < whole
    also_unet = build_plan_model(str(tiny_sd["pretrained"]))
    also_unet.frozen[0].enable_gradient_checkpointing()  # what the plan used to count, and the trainer never ran
    assert activation_bytes(also_unet, 4, "fp32", checkpointing=True) < checkpointed


def test_plan_of_a_missing_model_names_the_flag(tmp_path):
    proc = run_here("benchmark.py", ["--plan", "--model", str(tmp_path / "nowhere")])
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "dit-xl2" in proc.stderr


def test_plan_is_within_ten_percent_of_the_trainers_tracked_peak(tmp_path):
    """The benchmark's small DiT (4 blocks, 192 wide), trained through trainer.loop.train under the tracker."""
    proc = run_entry("benchmark.py", ["--check_plan", "--workdir", str(tmp_path)])
    assert_ok(proc)
    assert "within 10% of the plan" in proc.stdout and "NOT" not in proc.stdout


def test_benchmark_writes_every_figure(tiny, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_entry("benchmark.py", [
        "--config", "tiny_cpu", "--steps", "2", "--log_every", "1", "--warmup_intervals", "1", "--rounds", "1",
        "--out", str(out), "--workdir", str(tmp_path / "work"), f"model.pretrained={tiny['pretrained']}",
        "model.num_classes=4", f"data.target={tiny['target']}", f"data.bank={tiny['bank']}",
    ])  # fmt: skip
    assert_ok(proc)
    result = json.loads(out.read_text())
    assert set(result["step_ms"]) == {"difftune", "kd", "finetune", "plain"}
    assert all(v > 0 for v in result["step_ms"].values()) and result["flops_per_step_per_rank"] > 0
    assert result["mfu"] is None and result["peak_tflops"] is None  # CPU: no peak unless --peak_tflops
    assert result["ratio_difftune_over_plain"] == pytest.approx(
        result["step_ms"]["difftune"] / result["step_ms"]["plain"]
    )
    assert result["ratio_kd_over_difftune"] == pytest.approx(result["step_ms"]["kd"] / result["step_ms"]["difftune"])
    assert result["flops_ratio_kd_over_difftune"] > 1  # the teacher's forward on the retention slots
    assert "step-time ratio Diff-Tuning / minimal loop" in proc.stdout and "KD / Diff-Tuning" in proc.stdout


def test_every_rank_reports_its_tracked_peak_under_zero3(tiny, tmp_path):
    """The wiring of --check_plan_xl2, on the tiny DiT: 2 CPU ranks under ZeRO-3, each rank's peak tracked."""
    plan, measured, rss = tracked_ranks(tiny["pretrained"], tmp_path, num_ranks=2, steps=2, zero_stage=3)
    assert len(measured) == 2 and all(peak > plan.optimizer for peak in measured)
    assert all(process_peak > peak for process_peak, peak in zip(rss, measured))  # Linux: VmHWM
