"""Samples for evaluation, written as a restartable shard set by every rank (the bank job's machinery).

Sample i's condition and initial noise depend only on (eval.seed, i): a class-conditional family samples its
classes in turn (class-balanced); any other family (SD + ControlNet) takes the prompt and control of entry
i mod N of an evaluation set (eval.data) and samples with its own sampler (`family.sample`). Batches are cut at
fixed offsets inside each shard, so the same images come out of 1 rank or 64, and a killed run redoes only its
incomplete shards. A second model can take over the last reverse steps (the replacement curve).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data.shard_jobs import (
    derived_seed,
)
from models import family_class
from models.family import state_sha256
from models.samplers import initial_sample, scaled_input
from trainer.config import Config
from trainer.evaluation.data import ConditionSet
from trainer.jobs.shard_job import ShardJob

SAMPLE_FIELDS = {"image": "png", "label": "cls", "meta": "json"}
CONDITIONED_SAMPLE_FIELDS = {"image": "png", "meta": "json"}  # the entry's conditions stay in eval.data


def takes_eval_set(cfg: Config) -> bool:
    """A class-conditional family samples its classes in turn; any other takes its conditions from eval.data."""
    return tuple(family_class(cfg.model.family).condition_fields) != ("label",)


def resolve_model(path: str, key: str) -> Path:
    """A diffusers folder, or a run directory whose EMA export is evaluated."""
    folder = Path(path)
    if (folder / "export" / "ema").is_dir():
        return folder / "export" / "ema"
    if not folder.exists():
        raise FileNotFoundError(f"{key}={path} does not exist: point it to a diffusers model folder or a run directory")
    return folder


def load_model(cfg: Config, path: str, key: str, device: torch.device):
    """(family, denoiser on `device` in eval mode) of a model folder or run. DiT keeps the folder's label space.
    sd_controlnet: `path` is a ControlNet folder (the export of a run), used with the SD parts of model.pretrained;
    or a Stable Diffusion folder, whose ControlNet is the one training starts from without
    model.sd_controlnet.controlnet (`ControlNetModel.from_unet`, seeded with train.seed); or a saved
    StableDiffusionControlNetPipeline."""
    folder = resolve_model(path, key)
    if not takes_eval_set(cfg):  # a class-conditional family: the folder holds everything, its label space too
        family = family_class(cfg.model.family).from_pretrained(str(folder))
    else:
        from trainer.setup import load_family

        sd = cfg.model.sd_controlnet
        if (folder / "controlnet" / "config.json").is_file():
            model = replace(
                cfg.model, pretrained=str(folder), sd_controlnet=replace(sd, controlnet=str(folder / "controlnet"))
            )
        elif (folder / "unet").is_dir():
            model = replace(cfg.model, pretrained=str(folder), sd_controlnet=replace(sd, controlnet=None))
        elif (folder / "config.json").is_file():
            model = replace(cfg.model, sd_controlnet=replace(sd, controlnet=str(folder)))
        else:
            raise FileNotFoundError(
                f"{key}={path} is neither a ControlNet folder (config.json), a Stable Diffusion folder (unet/) nor a "
                "run directory (export/ema/): point it to the exported ControlNet of a run, or to the run itself"
            )
        family = load_family(replace(cfg, model=model))
    family.place_frozen(device)
    return family, family.denoiser.to(device).eval()


@dataclass
class Denoiser:
    """One model of a sampling chain: its family (conditions, guidance, decoding) and weights; `null` makes it
    denoise with the null condition whatever the chain's conditions (the pre-trained model of the chain of
    forgetting under eval.handover_labels=null)."""

    family: object
    module: torch.nn.Module
    null: bool = False

    def condition(self, fields: dict[str, torch.Tensor]):
        """What the family's `guided_epsilon` takes, from a batch's condition fields (labels, or captions and
        controls)."""
        size = len(next(iter(fields.values())))
        return self.family.condition(fields, torch.full((size,), self.null))


@torch.no_grad()
def sample_images(
    chain: list[tuple[Denoiser, int]], fields: dict[str, torch.Tensor], noise: torch.Tensor, sampler: str,
    num_steps: int, guidance_scale: float,
) -> torch.Tensor:  # fmt: skip
    """uint8 NCHW images for the condition `fields` (labels, or captions and controls); `chain` lists (model,
    number of reverse steps it takes), in order: a fine-tuned model for the first steps and a pre-trained one for
    the last p% is the chain of forgetting (paper Fig. 1)."""
    scheduler = chain[0][0].family.sampling_scheduler(sampler)  # one of the family's `samplers`
    scheduler.set_timesteps(num_steps)
    owners = [model for model, steps in chain for _ in range(steps)]
    if len(owners) != len(scheduler.timesteps):
        raise ValueError(f"the chain covers {len(owners)} steps, the sampler takes {len(scheduler.timesteps)}")
    device = next(chain[0][0].module.parameters()).device
    conditions = [model.condition({k: v.to(device) for k, v in fields.items()}) for model, _ in chain]
    condition_of = {id(model): condition for (model, _), condition in zip(chain, conditions, strict=True)}
    x = initial_sample(scheduler, noise.to(device))
    for model, t in zip(owners, scheduler.timesteps, strict=True):
        x_in = scaled_input(scheduler, x, t)
        eps = model.family.guided_epsilon(model.module, x_in, t, condition_of[id(model)], guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
    pixels = chain[-1][0].family.decode(x)
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def sample_start(seed: int, index: int, num_classes: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """Class, or evaluation-set entry (in turn), and initial noise of evaluation sample `index`."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(derived_seed(seed, index)))
    return index % num_classes, noise


def chain_fingerprint(chain: list[tuple[Denoiser, int]]) -> list:
    return [[state_sha256(model.module), model.family.frozen_fingerprint(), steps] for model, steps in chain]


def write_sample_set(
    directory: Path, chain: list[tuple[Denoiser, int]], settings: dict, *, rank: int, world: int,
    device: torch.device, log: Callable[[str], None] = print, conditions: ConditionSet | None = None,
) -> Path:  # fmt: skip
    """Fills `directory` with settings["num_samples"] samples of `chain`; complete shards are kept. With
    `conditions`, sample i takes those of entry i mod len(conditions) (recorded in its meta as "eval_index")."""
    num, per_shard, batch_size = settings["num_samples"], settings["samples_per_shard"], settings["batch_size"]
    shape, first = tuple(settings["sample_shape"]), chain[0][0]

    turns = settings["num_classes"] if conditions is None else len(conditions)  # classes, or evaluation entries

    def condition_fields(turn: list[int]) -> dict[str, torch.Tensor]:
        if conditions is None:
            return {"label": torch.tensor(turn, dtype=torch.long)}
        read = conditions.read(turn)
        return {name: read[name] for name in first.family.condition_fields}

    def samples(indices: range, on_batch: Callable[[int], None]) -> Iterator[dict]:
        for start in range(indices.start, indices.stop, batch_size):
            batch = range(start, min(start + batch_size, indices.stop))
            starts = [sample_start(settings["seed"], i, turns, shape) for i in batch]
            turn = [t for t, _ in starts]
            images = sample_images(
                chain, condition_fields(turn), torch.stack([n for _, n in starts]), settings["sampler"],
                settings["num_steps"], settings["guidance_scale"],
            )  # fmt: skip
            on_batch(len(batch))
            for position, i in enumerate(batch):
                record = {
                    "image": images[position].permute(1, 2, 0).numpy(),
                    "meta": {"index": i, "seed": settings["seed"]},
                }
                if conditions is None:
                    record["label"] = turn[position]
                else:
                    record["meta"]["eval_index"] = turn[position]
                yield record

    fields = SAMPLE_FIELDS if conditions is None else CONDITIONED_SAMPLE_FIELDS
    job = ShardJob(directory, {"kind": "eval_samples", "chain": chain_fingerprint(chain), **settings}, "eval.out",
                   rank=rank, world=world, device=device)  # fmt: skip
    result = job.run(num, per_shard, fields, samples, {"kind": "eval_samples", **settings}, unit="image")
    log(
        f"samples: {result.num_built} sampled ({num - result.num_built} already complete) in {result.seconds:.1f} s "
        f"on {world} rank(s) -> {directory}"
    )
    return directory
