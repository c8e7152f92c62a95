"""The training loop: plan -> loss -> backward -> step -> EMA -> log, under DeepSpeed.

Every rank runs the same global plan and computes its own slots of it; losses are weighted by global
counts, so the update is the single-process update on the whole batch (invariant 1).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from data.batch import MicroBatch, StepLoader
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, slot_ids
from data.shards import ShardDataset
from models import family_class
from trainer import checkpoint, distributed
from trainer.config import Config, ConfigError, gradient_accumulation_steps, to_yaml
from trainer.ema import EMA
from trainer.engine import build_engine, gradient_norm
from trainer.loss import NoiseSchedule, diffusion_loss, source_weights
from trainer.metrics import MetricsLogger

NUM_T_BUCKETS = 10


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Runs (or continues) a training run; returns its run directory."""
    rank, world_size, device = distributed.init()
    accumulation = gradient_accumulation_steps(cfg, world_size)
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir, resume, overwrite)
    family = family_class(cfg.model.family).from_pretrained(
        cfg.model.pretrained,
        vae=cfg.model.vae,
        num_classes=cfg.model.num_classes,
        class_init=cfg.model.class_init,
        num_attention_heads=cfg.model.num_attention_heads,
        seed=cfg.train.seed,
    )
    sources = open_sources(cfg, family)
    planner = GlobalBatchPlanner(
        global_batch_size=cfg.train.global_batch_size,
        num_target=len(sources[TARGET]),
        num_bank=len(sources[BANK]) if BANK in sources else 0,
        bank_ratio=cfg.method.bank_ratio,
        bank_rounding=cfg.method.bank_count,
        label_dropout=cfg.method.label_dropout,
        seed=cfg.train.seed,
        split=TimestepSplit(len(family.betas()), cfg.method.tau, cfg.method.timestep_weights, cfg.method.bank_tau),
    )
    distributed.barrier()  # all checks passed on every rank before the run directory is touched
    if rank == 0:
        if overwrite and not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    distributed.barrier()

    schedule = NoiseSchedule(family.betas())
    ema = EMA(family.denoiser, cfg.optim.ema_decay, device)
    parameters = family.tunable_parameters(family.denoiser)
    engine = build_engine(cfg, family.denoiser, parameters, accumulation)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    ckpt_root = run_dir / "checkpoints"
    start = checkpoint.load(engine, ema, ckpt_root) if resume and checkpoint.latest_tag(ckpt_root) else 0
    log = MetricsLogger(run_dir, rank == 0, start, cfg.train.steps, cfg.run.progress)
    slots = [
        slot_ids(
            rank=rank,
            micro_step=m,
            world_size=world_size,
            accumulation_steps=accumulation,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        for m in range(accumulation)
    ]
    n_target, n_bank = planner.num_target_slots, planner.num_bank_slots
    loader = StepLoader(planner, sources, slots, family.condition_fields)
    stats = StepStats(device)
    for step in range(start, cfg.train.steps):
        micro_batches = stats.timed_data(loader.get, step)
        for micro_step, batch in enumerate(micro_batches):
            batch = batch.to(device)
            losses = slot_losses(family, engine, batch, schedule, dtype)
            weights = source_weights(batch.is_bank, n_target, n_bank, cfg.method.bank_loss_weight).to(device)
            # DeepSpeed averages over ranks and accumulation steps; undo both to get the global weighted sum.
            engine.backward((losses * weights).sum() * world_size * accumulation)
            stats.grad_norm = gradient_norm(engine, parameters) if micro_step == accumulation - 1 else None
            engine.step()
            stats.add(losses.detach(), weights, batch, schedule.num_timesteps)
        ema.update(engine.module)
        stats.finish_step(engine, cfg.train.global_batch_size)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.train.steps:
            log.scalars(done, stats.report(engine))
        if cfg.run.sample_every and done % cfg.run.sample_every == 0:
            sample_grid(family, ema, cfg, log, done, device, rank)
        if done % cfg.run.ckpt_every == 0 or done == cfg.train.steps:
            checkpoint.save(engine, ema, done, ckpt_root, rank)
        log.advance()
    loader.close()
    log.close()
    if cfg.run.export:
        export(family, engine, ema, run_dir, rank, sources[TARGET].manifest.meta.get("classes"))
    return run_dir


def slot_losses(family, denoiser, batch: MicroBatch, schedule: NoiseSchedule, dtype: torch.dtype):
    """Per-slot loss of the pre-trained objective on this micro-batch (float32 whatever the precision)."""
    x_t = schedule.add_noise(batch.x0, batch.noise, batch.t)
    condition = family.condition(batch.condition, batch.null_condition)
    output = family.predict(denoiser, x_t.to(dtype), batch.t, condition)
    return diffusion_loss(output.float(), batch.x0, x_t, batch.noise, batch.t, schedule)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty: pass --resume to continue it, "
            "--overwrite to replace it, or set run.dir to a new folder (nothing in it was touched)"
        )


def open_sources(cfg: Config, family) -> dict[int, ShardDataset]:
    """Opens (and checks against their manifests) the target shards and, for Diff-Tuning, the bank."""
    sources = {TARGET: ShardDataset(cfg.data.target, verify=cfg.data.verify)}
    if cfg.method.bank_ratio > 0:
        sources[BANK] = ShardDataset(cfg.data.bank, verify=cfg.data.verify)
    for source, key in ((TARGET, "data.target"), (BANK, "data.bank")):
        if source not in sources:
            continue
        dataset = sources[source]
        shape = tuple(np.shape(dataset[0]["x"])) if "x" in dataset.manifest.fields and len(dataset) else None
        if shape != tuple(family.sample_shape):
            raise ConfigError(
                f"{key}: the samples' field 'x' has shape {shape} but the model expects "
                f"{tuple(family.sample_shape)}: prepare the shards with this model's VAE and resolution"
            )
    classes = sources[TARGET].manifest.meta.get("classes")
    if classes is not None and len(classes) > family.null_condition:
        raise ConfigError(
            f"the target data has {len(classes)} classes but the model's label space has "
            f"{family.null_condition}: set model.num_classes={len(classes)}"
        )
    return sources


class StepStats:
    """Local sums of one logging interval, reduced over ranks only when reported."""

    def __init__(self, device: torch.device):
        self.device = device
        self.grad_norm: float | None = None
        self._reset()

    def _reset(self) -> None:
        # total, target sum, target count, bank sum, bank count, then per t-bucket sums and counts
        self.sums = torch.zeros(5 + 2 * NUM_T_BUCKETS, dtype=torch.float64, device=self.device)
        self.data_seconds = self.step_seconds = 0.0
        self.images = self.steps = 0
        self.last_grad_norm: float | None = None
        self.started = time.perf_counter()

    def timed_data(self, fn, *args):
        begin = time.perf_counter()
        out = fn(*args)
        self.data_seconds += time.perf_counter() - begin
        return out

    def add(self, losses: torch.Tensor, weights: torch.Tensor, batch: MicroBatch, num_timesteps: int) -> None:
        losses, bank = losses.double(), batch.is_bank
        bucket = (batch.t * NUM_T_BUCKETS // num_timesteps).to(self.device)
        self.sums[0] += (losses * weights).sum()
        self.sums[1] += losses[~bank].sum()
        self.sums[2] += (~bank).sum()
        self.sums[3] += losses[bank].sum()
        self.sums[4] += bank.sum()
        self.sums[5 : 5 + NUM_T_BUCKETS].index_add_(0, bucket, losses)
        self.sums[5 + NUM_T_BUCKETS :].index_add_(0, bucket, torch.ones_like(losses))

    def finish_step(self, engine, global_batch_size: int) -> None:
        if self.grad_norm is None:  # ZeRO and bf16 optimizers report the norm after their step
            norm = engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        self.last_grad_norm = self.grad_norm
        self.images += global_batch_size
        self.steps += 1

    def report(self, engine) -> dict[str, float]:
        """All-reduces the interval's sums (a collective) and returns the scalars to log."""
        sums = distributed.all_reduce_sum(self.sums.clone()).tolist()
        elapsed = time.perf_counter() - self.started
        values = {
            "loss/total": sums[0] / self.steps,
            "loss/target": sums[1] / sums[2] if sums[2] else None,
            "loss/bank": sums[3] / sums[4] if sums[4] else None,
            "grad_norm": self.last_grad_norm,
            "lr": float(engine.get_lr()[0]),
            "images_per_second": self.images / elapsed,
            "time/data_wait_fraction": self.data_seconds / elapsed,  # reading is ahead: only the wait counts
        }
        for b in range(NUM_T_BUCKETS):
            count = sums[5 + NUM_T_BUCKETS + b]
            values[f"loss_t/{b:02d}"] = sums[5 + b] / count if count else None
        self._reset()
        return values


def sample_grid(family, ema: EMA, cfg: Config, log: MetricsLogger, step: int, device, rank: int) -> None:
    """Rank 0 samples its whole EMA copy, so no collective is needed and the other ranks go on."""
    if rank != 0:
        return
    model = family.denoiser_from_state_dict(ema.state_dict()).to(device)
    labels = torch.arange(cfg.run.num_sample_images) % family.null_condition
    generator = torch.Generator().manual_seed(cfg.train.seed)
    images = family.sample(model, labels, num_steps=cfg.run.sample_steps, generator=generator)
    log.images(step, images)


def export(family, engine, ema: EMA, run_dir: Path, rank: int, class_names) -> None:
    """Writes EMA and raw weights in diffusers format under run_dir/export (gathering is a collective)."""
    with distributed.full_parameters(engine.module):
        raw = (
            {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
        )
    if rank == 0:
        family.export(ema.state_dict(), run_dir / "export" / "ema", class_names)
        family.export(raw, run_dir / "export" / "raw", class_names)
    distributed.barrier()
