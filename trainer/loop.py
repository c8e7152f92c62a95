"""The training loop: plan -> loss -> backward -> step -> EMA -> log, under DeepSpeed.

Every rank runs the same global plan and computes its own slots of it; losses are weighted by global
counts, so the update is the single-process update on the whole batch (invariant 1). The data side's
state is the step number, so a checkpoint plus the step resumes the run exactly, on any number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data.batch import MicroBatch, StepLoader, start_worker_server
from data.sampler import TARGET, slot_ids
from models.family import to_device
from models.tuning import save_adapter
from trainer import checkpoint, distributed
from trainer.checkpoint import RunState
from trainer.config import Config, MethodConfig, describe_batch, gradient_accumulation_steps, with_micro_batch
from trainer.convergence import convergence_tracker
from trainer.ema import ShardedEMA
from trainer.ema_start import start_ema_from
from trainer.engine import build_engine
from trainer.host_reads import HostReadLog, host_side
from trainer.loss import snr_loss_weights, source_weights
from trainer.metrics import MetricsLogger, StepStats
from trainer.preemption import Preempted, PreemptionFlag
from trainer.retention import Retention, retention_method
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
    rank, world_size, device = distributed.init(cfg.train.collective_timeout_minutes)
    accumulation = gradient_accumulation_steps(cfg, world_size)
    if rank == 0:
        print(describe_batch(cfg, world_size), flush=True)
    cfg = with_micro_batch(cfg, world_size)  # `auto` becomes this world size's number, for the engine and the slots
    run_dir, ckpt_root = Path(cfg.run.dir), Path(cfg.run.dir) / "checkpoints"
    check_run_dir(run_dir, resume, overwrite)
    # Decoding workers fork from a fresh server, not from this rank once it holds its model; the server imports
    # the trainer (what launch scripts import, and workers re-import) while the model is built.
    start_worker_server(cfg.data.num_workers, preload=("trainer.loop",))
    family = load_family(cfg, training=True)  # under ZeRO-3 built partitioned: no rank holds all weights
    tuning = apply_tuning(cfg, family, rank)  # which parameters train (full, DiffFit, BitFit, LoRA)
    retention = retention_method(cfg)  # what keeps pre-trained knowledge: bank replay or distillation
    sources = open_sources(cfg, family, retention, rank, world_size)
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

    process = family.noise_process.to(device)  # noise levels, noising and the per-sample loss (models/noise/)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    family.place_frozen(device, dtype)
    # KD: the frozen teacher, outside DeepSpeed, in the training precision
    retention.prepare(device, dtype, lambda: load_family(cfg, num_classes=0))
    groups = tuning.parameter_groups(family.denoiser, cfg.optim.lr)
    engine, optimizer = build_engine(cfg, family.denoiser, groups, accumulation, universal, device)
    ema = ShardedEMA(engine, cfg.optim.ema_decay)  # each rank: the EMA of the fp32 master slice it owns
    if cfg.model.ema_from and saved is None:
        start_ema_from(ema, cfg)  # a continual stage carries the previous stage's EMA on
    state = RunState(world_size=world_size, partitioned=partitioned, plan=run_plan(cfg, planner))
    if saved is not None:
        checkpoint.load(engine, ema, ckpt_root, saved, universal, rank)
        state.step, state.applied_steps = saved.step, saved.applied_steps
        state.skipped_steps, state.consecutive_skips = saved.skipped_steps, saved.consecutive_skips
        optimizer.counters.restore(saved.applied_steps, saved.skipped_steps, saved.consecutive_skips)
    slots = [
        slot_ids(rank=rank, micro_step=m, world_size=world_size, accumulation_steps=accumulation,
                 micro_batch_size=cfg.train.micro_batch_size)
        for m in range(accumulation)
    ]  # fmt: skip
    loader = StepLoader(
        planner, sources, slots, family.condition_fields,
        num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch, pin_memory=device.type == "cuda",
    )  # fmt: skip
    log = MetricsLogger(run_dir, rank == 0, state.step, cfg.train.steps, cfg.run.progress)
    stats, preemption = StepStats(device, process.level_bucket, retention.name), PreemptionFlag()
    ledger = open_ledger(run_dir, rank) if cfg.debug.sample_ledger else None
    host_reads = HostReadLog(run_dir, rank) if cfg.debug.count_host_reads else None
    step_fn = StepFunction(cfg, family, engine, optimizer, planner, process, retention, stats)
    boundary = Boundary(cfg, family, engine, optimizer, ema, state, log, stats, preemption, ckpt_root, rank)
    try:
        for step in range(state.step, cfg.train.steps):
            with host_reads or contextlib.nullcontext():
                micro_batches = stats.timed_data(loader.get, step)  # planned and read one step ahead
                applied = step_fn(step, micro_batches)  # loss -> backward -> optimizer step, on every rank
                ema.update(applied)
                state.step += 1
                if ledger:
                    write_ledger(ledger, step, micro_batches)
                if tracker is not None:  # every rank: gathers the ControlNet; its time is not training throughput
                    stats.started += tracker.after_step(state.step, engine, log)
                logged, saved_now = after_step(boundary)
            if host_reads:
                host_reads.write(state.step, logged, saved_now)
    finally:
        preemption.close()
        loader.close()
        log.close()
        for file in (ledger, host_reads):
            if file:
                file.close()
    if cfg.run.export:
        export(family, engine, ema, run_dir, rank, sources[TARGET].manifest.meta.get("classes"), tuning)
    return run_dir


class StepFunction:
    """One global step on this rank's slots: per-slot losses -> weighted backward -> optimizer step.
    Reads nothing back from the device; returns the applied flag (a device tensor)."""

    def __init__(self, cfg, family, engine, optimizer, planner, process, retention, stats):
        self.cfg, self.family, self.engine, self.optimizer = cfg, family, engine, optimizer
        self.process, self.retention, self.stats = process, retention, stats
        self.rank, self.device = engine.global_rank, engine.device
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        # Retention slots (the plan's bank slots: bank samples or KD slots) weigh retention.loss_weight in all.
        self.counts = (planner.num_target_slots, planner.num_bank_slots, retention.loss_weight)
        # DeepSpeed averages over ranks and accumulation steps; undoing both gives the global weighted sum.
        self.loss_scale = engine.world_size * gradient_accumulation_steps(cfg, engine.world_size)

    def __call__(self, step: int, micro_batches: list[MicroBatch]) -> torch.Tensor:
        self.optimizer.begin_step()
        for host_batch in micro_batches:
            weights = to_device(source_weights(host_batch.is_retention, *self.counts), self.device)
            batch = host_batch.to(self.device)
            # The plan's null mask stays on the host too: a family may skip work for null slots without a sync.
            batch.null_condition = host_side(host_batch.null_condition)
            losses = slot_losses(
                self.family, self.engine, batch, self.process, self.dtype, self.cfg.method, self.retention
            )
            losses = losses * injected_nan(self.cfg, step, self.rank)
            self.optimizer.note_losses(losses)
            self.engine.backward((losses * weights).sum() * self.loss_scale)
            self.engine.step()
            self.stats.add(losses.detach(), weights, batch.is_retention, batch.t)
        applied = self.optimizer.finish_step(step + 1)
        self.stats.finish_step(self.cfg.train.global_batch_size, self.optimizer.grad_norm)
        return applied


def slot_losses(
    family,
    denoiser,
    batch: MicroBatch,
    process,
    dtype: torch.dtype,
    method: MethodConfig | None = None,
    retention: Retention | None = None,
):
    """Per-slot loss of the pre-trained objective, the family's noise process's, on this micro-batch (float32
    whatever the precision), its regression term re-weighted by method.loss_weighting (all 1 for none); the
    retention method puts its own loss in its slots' places (bank replay keeps the objective)."""
    x_t = process.add_noise(batch.x0, batch.noise, batch.t)
    condition = family.condition(batch.condition, batch.null_condition)
    model_input, model_level = process.model_input(x_t, batch.t)  # x_t and t for DDPM; EDM's c_in x_t, c_noise
    output = family.predict(denoiser, model_input.to(dtype), model_level, condition)
    mse_weights = None if method is None else snr_loss_weights(process.snr(batch.t), method)
    losses = process.loss(output.float(), batch.x0, x_t, batch.noise, batch.t, mse_weights)
    return losses if retention is None else retention.slot_losses(losses, output, model_input, model_level, batch)


@dataclass
class Boundary:
    """What the step boundary's bookkeeping works on (one object rather than a dozen arguments)."""

    cfg: Config
    family: object
    engine: object
    optimizer: object  # trainer.optim.GuardedAdamW
    ema: ShardedEMA
    state: RunState
    log: MetricsLogger
    stats: StepStats
    preemption: PreemptionFlag
    ckpt_root: Path
    rank: int


def after_step(run: Boundary) -> tuple[bool, bool]:
    """Logging, sample grids, checkpoints and preemption: the step boundary's bookkeeping. Only log and save
    steps read the device; returns (logged, saved)."""
    cfg, state, done = run.cfg, run.state, run.state.step
    logging = done % cfg.run.log_every == 0 or done == cfg.train.steps
    preempted = run.preemption.agreed()
    saving = preempted or done % cfg.run.ckpt_every == 0 or done == cfg.train.steps
    if logging or saving:
        state.applied_steps, state.skipped_steps, state.consecutive_skips, tripped_at = run.optimizer.counters.read()
        if tripped_at:
            limit = cfg.train.max_consecutive_skips
            raise NonFiniteError(
                f"step {tripped_at}: {limit} consecutive steps had a non-finite loss or gradient on some rank and "
                f"were skipped (train.max_consecutive_skips={limit}); lower optim.lr, set optim.grad_clip, or "
                "check the data; the last good checkpoint is in run.dir/checkpoints"
            )
    if logging:
        run.log.scalars(done, run.stats.report(run.engine, state.skipped_steps))
    if cfg.run.sample_every and done % cfg.run.sample_every == 0:
        sample_grid(run.family, run.engine, run.ema, cfg, run.log, done)
    if saving:
        crash = crash_hook(cfg, done, run.rank)
        checkpoint.save(run.engine, run.ema, state, run.ckpt_root, run.rank, cfg.run.keep_last, crash)
    run.log.advance()
    if preempted:
        raise Preempted(done)
    return logging, saving


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


def sample_grid(family, engine, ema: ShardedEMA, cfg: Config, log: MetricsLogger, step: int) -> None:
    """Every rank samples the grid with the EMA swapped into the training module (a collective under ZeRO, and
    no second whole model on one rank); rank 0 writes it."""
    module, bf16 = engine.module, cfg.train.precision == "bf16"
    was_training = module.training
    with ema.swapped_in(), torch.autocast(engine.device.type, torch.bfloat16, enabled=bf16):
        module.eval()
        images = family.preview(module, cfg.run.num_sample_images, cfg.run.sample_steps, seed=cfg.train.seed)
    module.train(was_training)
    log.images(step, images.float())


def export(family, engine, ema: ShardedEMA, run_dir: Path, rank: int, class_names, tuning) -> None:
    """Writes EMA and raw weights in diffusers format under run_dir/export (gathering is a collective), merged
    with the PEFT method's additions, and the adapter alone beside them (export/ema_adapter, raw_adapter).
    Rank 0 writes the EMA, the last rank the raw weights: two ranks share the writing, the others wait."""
    ema_state = ema.full_state_dict()  # on rank 0
    raw_rank = engine.world_size - 1
    with distributed.full_parameters(engine.module):
        raw = (
            {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
            if rank == raw_rank
            else None
        )
    for which, state, writer in (("ema", ema_state, 0), ("raw", raw, raw_rank)):
        if rank == writer:
            family.export(tuning.merged_state_dict(state), run_dir / "export" / which, class_names)
            adapter = save_adapter(tuning, state, run_dir / "export" / f"{which}_adapter")
            if adapter:  # also in the format the family's pipeline loads, where it has one
                family.export_adapter(adapter, run_dir / "export" / f"{which}_adapter")
    distributed.barrier()  # waits for the writers, for up to train.collective_timeout_minutes
