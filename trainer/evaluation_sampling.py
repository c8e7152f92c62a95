"""Samples for evaluation, written as a restartable shard set by every rank (the bank job's machinery).

Sample i's class (classes in turn: class-balanced) and initial noise depend only on (eval.seed, i), and batches
are cut at fixed offsets inside each shard, so the same images come out of 1 rank or 64, and a killed run
redoes only its incomplete shards. A second model can take over the last reverse steps (the replacement curve).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm import tqdm

from data.shard_jobs import (
    claim_directory,
    derived_seed,
    merge_manifest,
    shard_ranges,
    shards_to_build,
    write_owned_shard,
)
from data.shards import ShardError
from models import family_class
from trainer import distributed
from trainer.config import ConfigError
from trainer.generate import state_sha256

SAMPLE_FIELDS = {"image": "png", "label": "cls", "meta": "json"}
SAMPLERS = ("ddim", "dpm++")


def resolve_model(path: str, key: str) -> Path:
    """A diffusers folder, or a run directory whose EMA export is evaluated."""
    folder = Path(path)
    if (folder / "export" / "ema").is_dir():
        return folder / "export" / "ema"
    if not folder.exists():
        raise FileNotFoundError(f"{key}={path} does not exist: point it to a diffusers model folder or a run directory")
    return folder


def load_model(path: str, key: str, device: torch.device):
    """(family, denoiser on `device` in eval mode) of a model folder, keeping its label space."""
    family = family_class("dit").from_pretrained(str(resolve_model(path, key)))
    family.place_frozen(device)
    return family, family.denoiser.to(device).eval()


@dataclass
class Denoiser:
    """One model of a sampling chain: its family (null class, decoding), weights and the labels it sees."""

    family: object
    module: torch.nn.Module
    labels_of: Callable[[torch.Tensor], torch.Tensor]  # the chain's labels -> the labels this model gets


def make_scheduler(scheduler_config: dict, sampler: str, num_steps: int):
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler_config)
    elif sampler == "dpm++":
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    else:
        raise ConfigError(f"eval.sampler={sampler!r} is not one of {SAMPLERS}")
    scheduler.set_timesteps(num_steps)
    return scheduler


def guided_epsilon(model: Denoiser, x: torch.Tensor, t: int, labels: torch.Tensor, guidance_scale: float):
    """The model's ε with classifier-free guidance against its own null class (as DiTFamily.sample does)."""
    family, channels = model.family, x.shape[1]
    t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
    if guidance_scale == 1.0:
        return family.predict(model.module, x, t_batch, labels)[:, :channels]
    null = torch.full_like(labels, family.null_condition)
    both = family.predict(model.module, torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
    cond, uncond = both[:, :channels].chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_images(
    chain: list[tuple[Denoiser, int]], labels: torch.Tensor, noise: torch.Tensor, scheduler_config: dict,
    sampler: str, num_steps: int, guidance_scale: float,
) -> torch.Tensor:  # fmt: skip
    """uint8 NCHW images; `chain` lists (model, number of reverse steps it takes), in order: a fine-tuned model
    for the first steps and a pre-trained one for the last p% is the chain of forgetting (paper Fig. 1)."""
    scheduler = make_scheduler(scheduler_config, sampler, num_steps)
    owners = [model for model, steps in chain for _ in range(steps)]
    if len(owners) != len(scheduler.timesteps):
        raise ValueError(f"the chain covers {len(owners)} steps, the sampler takes {len(scheduler.timesteps)}")
    device = next(chain[0][0].module.parameters()).device
    x, labels = noise.to(device), labels.to(device)
    for model, t in zip(owners, scheduler.timesteps, strict=True):
        x = scheduler.step(guided_epsilon(model, x, t, model.labels_of(labels), guidance_scale), t, x).prev_sample
    family = chain[-1][0].family
    pixels = x.clamp(-1, 1) if family.vae is None else family.decode(x)
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def sample_start(seed: int, index: int, num_classes: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """Class (in turn) and initial noise of evaluation sample `index`."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(derived_seed(seed, index)))
    return index % num_classes, noise


def chain_fingerprint(chain: list[tuple[Denoiser, int]]) -> list:
    return [[state_sha256(model.module), steps] for model, steps in chain]


def write_sample_set(
    directory: Path, chain: list[tuple[Denoiser, int]], settings: dict, *, rank: int, world: int,
    device: torch.device, log: Callable[[str], None] = print,
) -> Path:  # fmt: skip
    """Fills `directory` with settings["num_samples"] samples of `chain`; complete shards are kept."""
    job = {"kind": "eval_samples", "chain": chain_fingerprint(chain), **settings}
    claim_directory(directory, job, "eval.out")
    num, per_shard, batch_size = settings["num_samples"], settings["samples_per_shard"], settings["batch_size"]
    shape, first = tuple(settings["sample_shape"]), chain[0][0]

    def samples(indices: range, on_batch: Callable[[int], None]) -> Iterator[dict]:
        for start in range(indices.start, indices.stop, batch_size):
            batch = range(start, min(start + batch_size, indices.stop))
            starts = [sample_start(settings["seed"], i, settings["num_classes"], shape) for i in batch]
            labels = torch.tensor([label for label, _ in starts], dtype=torch.long)
            images = sample_images(
                chain, labels, torch.stack([n for _, n in starts]), first.family.scheduler_config,
                settings["sampler"], settings["num_steps"], settings["guidance_scale"],
            )  # fmt: skip
            on_batch(len(batch))
            for position, i in enumerate(batch):
                image = images[position].permute(1, 2, 0).numpy()
                yield {"image": image, "label": int(labels[position]), "meta": {"index": i, "seed": settings["seed"]}}

    ranges = shard_ranges(num, per_shard)
    todo = shards_to_build(directory, ranges, rank, world)
    num_todo = sum(len(ranges[j]) for j in todo)
    bar = tqdm(total=num_todo, desc=f"samples (rank 0 of {world})", unit="image", disable=rank != 0)
    started = time.perf_counter()
    for j in todo:
        write_owned_shard(directory, j, samples(ranges[j], bar.update), SAMPLE_FIELDS, ranges[j].start)
    bar.close()
    distributed.barrier()
    sampled = int(distributed.all_reduce_sum(torch.tensor([float(num_todo)], device=device)).item())
    error = None
    if rank == 0:
        try:
            merge_manifest(directory, num, per_shard, SAMPLE_FIELDS, {"kind": "eval_samples", **settings})
        except ShardError as err:
            error = err
    if distributed.any_rank(error is not None, device):
        raise error or ShardError(f"rank 0 could not write the manifest of {directory}: see its message")
    seconds = time.perf_counter() - started
    log(
        f"samples: {sampled} sampled ({num - sampled} already complete) in {seconds:.1f} s on {world} rank(s) "
        f"-> {directory}"
    )
    return directory
