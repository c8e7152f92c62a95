"""The training loop: plan -> loss -> backward -> step -> EMA -> log, under DeepSpeed.

Every rank runs the same global plan and computes its own slots of it; losses are weighted by global
counts, so the update is the single-process update on the whole batch (invariant 1). The data side's
state is the step number, so a checkpoint plus the step resumes the run exactly, on any number of ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data.batch import MicroBatch, StepLoader
from data.sampler import TARGET, slot_ids
from models.tuning import save_adapter
from trainer import checkpoint, distributed
from trainer.checkpoint import RunState
from trainer.config import Config, gradient_accumulation_steps
from trainer.convergence import convergence_tracker
from trainer.ema import EMA
from trainer.engine import build_engine, gradient_norm
from trainer.loss import NoiseSchedule, diffusion_loss, source_weights
from trainer.metrics import MetricsLogger, StepStats
from trainer.preemption import Preempted, PreemptionFlag
from trainer.setup import (
    apply_tuning,
    build_planner,
    check_run_dir,
    create_run_dir,
    load_family,
    open_sources,
    run_plan,
    truncate_ledger,
)


class NonFiniteError(RuntimeError):
    pass


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Runs (or continues) a training run; returns its run directory."""
    rank, world_size, device = distributed.init()
    accumulation = gradient_accumulation_steps(cfg, world_size)
    run_dir, ckpt_root = Path(cfg.run.dir), Path(cfg.run.dir) / "checkpoints"
    check_run_dir(run_dir, resume, overwrite)
    family = load_family(cfg)
    tuning = apply_tuning(cfg, family, rank)
    sources = open_sources(cfg, family)
    planner = build_planner(cfg, family, sources)
    partitioned = cfg.train.zero_stage > 0 or cfg.train.precision == "bf16"
    saved, universal = (None, False)
    if resume:
        saved, universal = checkpoint.resume_plan(
            ckpt_root, world_size, partitioned, run_plan(cfg, planner), cfg.run.allow_plan_change
        )
    tracker = convergence_tracker(cfg, family, run_dir, rank, world_size, device, saved.step if saved else 0)
    distributed.barrier()  # every rank passed its checks before the run directory is touched
    if rank == 0:
        create_run_dir(run_dir, cfg, overwrite and not resume) if saved is None else truncate_ledger(
            run_dir, saved.step
        )
    distributed.barrier()

    schedule = NoiseSchedule(family.betas())
    family.place_frozen(device)
    ema = EMA(family.denoiser, cfg.optim.ema_decay, device)
    parameters = family.tunable_parameters(family.denoiser)
    groups = tuning.parameter_groups(family.denoiser, cfg.optim.lr)
    engine, optimizer = build_engine(cfg, family.denoiser, groups, accumulation, universal)
    state = RunState(world_size=world_size, partitioned=partitioned, plan=run_plan(cfg, planner))
    if saved is not None:
        checkpoint.load(engine, ema, ckpt_root, universal, rank)
        state.step, state.applied_steps = saved.step, saved.applied_steps
        state.skipped_steps, state.consecutive_skips = saved.skipped_steps, saved.consecutive_skips
    slots = [
        slot_ids(rank=rank, micro_step=m, world_size=world_size, accumulation_steps=accumulation,
                 micro_batch_size=cfg.train.micro_batch_size)
        for m in range(accumulation)
    ]  # fmt: skip
    loader = StepLoader(planner, sources, slots, family.condition_fields)
    log = MetricsLogger(run_dir, rank == 0, state.step, cfg.train.steps, cfg.run.progress)
    stats, preemption = StepStats(device), PreemptionFlag()
    ledger = open_ledger(run_dir, rank) if cfg.debug.sample_ledger else None
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    weigh = lambda batch: source_weights(  # noqa: E731
        batch.is_bank, planner.num_target_slots, planner.num_bank_slots, cfg.method.bank_loss_weight
    ).to(device)
    try:
        for step in range(state.step, cfg.train.steps):
            micro_batches = stats.timed_data(loader.get, step)
            optimizer.begin_step(state.applied_steps)
            for micro_step, batch in enumerate(micro_batches):
                batch = batch.to(device)
                losses = slot_losses(family, engine, batch, schedule, dtype) * injected_nan(cfg, step, rank)
                optimizer.loss_nonfinite |= not bool(torch.isfinite(losses).all())
                # DeepSpeed averages over ranks and accumulation steps; undo both to get the global weighted sum.
                engine.backward((losses * weigh(batch)).sum() * world_size * accumulation)
                stats.grad_norm = gradient_norm(engine, parameters) if micro_step == accumulation - 1 else None
                engine.step()
                stats.add(losses.detach(), weigh(batch), batch, schedule.num_timesteps)
            skipped = optimizer.skipped()
            if not skipped:
                ema.update(engine.module)
            advance(state, skipped, cfg.train.max_consecutive_skips)
            stats.finish_step(engine, cfg.train.global_batch_size, skipped)
            if ledger:
                write_ledger(ledger, step, micro_batches)
            if tracker is not None:  # every rank: gathers the ControlNet; its time is not training throughput
                stats.started += tracker.after_step(state.step, engine, log)
            after_step(cfg, state, engine, ema, family, log, stats, ckpt_root, rank, device, preemption, tuning)
    finally:
        loader.close()
        log.close()
        if ledger:
            ledger.close()
    if cfg.run.export:
        export(family, engine, ema, run_dir, rank, sources[TARGET].manifest.meta.get("classes"), tuning)
    return run_dir


def slot_losses(family, denoiser, batch: MicroBatch, schedule: NoiseSchedule, dtype: torch.dtype):
    """Per-slot loss of the pre-trained objective on this micro-batch (float32 whatever the precision)."""
    x_t = schedule.add_noise(batch.x0, batch.noise, batch.t)
    condition = family.condition(batch.condition, batch.null_condition)
    output = family.predict(denoiser, x_t.to(dtype), batch.t, condition)
    return diffusion_loss(output.float(), batch.x0, x_t, batch.noise, batch.t, schedule)


def advance(state: RunState, skipped: bool, max_consecutive_skips: int) -> None:
    state.step += 1
    if not skipped:
        state.applied_steps, state.consecutive_skips = state.applied_steps + 1, 0
        return
    state.skipped_steps, state.consecutive_skips = state.skipped_steps + 1, state.consecutive_skips + 1
    if state.consecutive_skips >= max_consecutive_skips:
        raise NonFiniteError(
            f"step {state.step}: {state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
            f"on some rank and were skipped (train.max_consecutive_skips={max_consecutive_skips}); lower optim.lr, "
            "set optim.grad_clip, or check the data; the last good checkpoint is in run.dir/checkpoints"
        )


def after_step(cfg, state, engine, ema, family, log, stats, ckpt_root, rank, device, preemption, tuning) -> None:
    """Logging, sample grids, checkpoints and preemption: the step boundary's bookkeeping."""
    done = state.step
    if done % cfg.run.log_every == 0 or done == cfg.train.steps:
        log.scalars(done, stats.report(engine, state.skipped_steps))
    if cfg.run.sample_every and done % cfg.run.sample_every == 0:
        sample_grid(family, ema, cfg, log, done, device, rank, tuning)
    preempted = preemption.agreed(device)
    if preempted or done % cfg.run.ckpt_every == 0 or done == cfg.train.steps:
        crash = crash_hook(cfg, done, rank)
        checkpoint.save(engine, ema, state, ckpt_root, rank, cfg.run.keep_last, crash)
    log.advance()
    if preempted:
        raise Preempted(done)


def injected_nan(cfg: Config, step: int, rank: int) -> float:
    d = cfg.debug
    return float("nan") if rank == d.nan_rank and d.nan_at_step <= step < d.nan_at_step + d.nan_steps else 1.0


def crash_hook(cfg: Config, step: int, rank: int):
    if step == cfg.debug.crash_in_save_step and rank == cfg.debug.crash_rank:
        return lambda: os._exit(17)
    return None


def open_ledger(run_dir: Path, rank: int):
    (run_dir / "ledger").mkdir(exist_ok=True)
    return open(run_dir / "ledger" / f"rank{rank}.jsonl", "a")


def write_ledger(ledger, step: int, micro_batches: list[MicroBatch]) -> None:
    for batch in micro_batches:
        for slot, source, index in batch.ids.tolist():
            ledger.write(json.dumps({"step": step, "slot": slot, "source": source, "index": index}) + "\n")
    ledger.flush()


def sample_grid(family, ema: EMA, cfg: Config, log: MetricsLogger, step: int, device, rank: int, tuning) -> None:
    """Rank 0 samples its whole EMA copy, so no collective is needed and the other ranks go on."""
    if rank != 0:
        return
    model = family.denoiser_from_state_dict(tuning.merged_state_dict(ema.state_dict())).to(device)
    log.images(step, family.preview(model, cfg.run.num_sample_images, cfg.run.sample_steps, seed=cfg.train.seed))


def export(family, engine, ema: EMA, run_dir: Path, rank: int, class_names, tuning) -> None:
    """Writes EMA and raw weights in diffusers format under run_dir/export (gathering is a collective), merged
    with the PEFT method's additions, and the adapter alone beside them (export/ema_adapter, raw_adapter)."""
    with distributed.full_parameters(engine.module):
        raw = (
            {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
        )
    if rank == 0:
        for which, state in (("ema", ema.state_dict()), ("raw", raw)):
            family.export(tuning.merged_state_dict(state), run_dir / "export" / which, class_names)
            save_adapter(tuning, state, run_dir / "export" / f"{which}_adapter")
    distributed.barrier()
