"""Distributed evaluation of a model folder or run (launch/evaluate.py): sample metrics and the forgetting analyses.

eval.mode=metrics samples eval.num_samples images on every rank and compares them with eval.reference (FID, sFID,
KID, precision/recall): a class-conditional family (DiT) samples its classes in turn, any other (SD + ControlNet)
takes the prompt and control map of entry i mod N of eval.data for sample i. replacement hands the last p% of the
reverse steps to eval.pretrained (the chain of forgetting) and gives the metrics per p (DiT); denoising and drift
are in trainer/evaluation/analyses.py.
Everything lands in eval.out: results JSON, a printed table, sample grids and plots (rank 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from data.files import atomic_write_bytes
from models import family_class, family_entry
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.evaluation.data import (
    ImageSet,
    image_maps,
    image_size_of,
    open_condition_set,
    open_image_set,
    reference_features,
    set_features,
)
from trainer.evaluation.features import all_metrics, check_feature_source, load_extractor
from trainer.evaluation.sampling import Denoiser, load_model, takes_eval_set, write_sample_set
from trainer.metrics import image_grid

MODES = ("metrics", "replacement", "denoising", "drift")
METRIC_NAMES = ("fid", "sfid", "kid", "precision", "recall")


def check_conditioned_config(cfg: Config) -> None:
    """The rules for a family whose samples take their conditions from an evaluation set (SD + ControlNet)."""
    ev, family = cfg.eval, cfg.model.family
    if not cfg.model.pretrained:
        raise ConfigError(
            f"model.pretrained must be set for model.family={family}: the Stable Diffusion folder whose UNet, VAE and "
            "text encoder the evaluated ControlNet runs with (the one it was trained with)"
        )
    if ev.mode in ("metrics", "replacement") and not ev.data:
        raise ConfigError(
            f"eval.data must be set for eval.mode={ev.mode} with model.family={family}: shards prepared by "
            "launch/prepare_data.py (held-out images, captions and control maps) whose prompts and controls the "
            "samples take, e.g. eval.data=/data/val_shards"
        )


def check_eval_config(cfg: Config) -> None:
    """Cross-field rules of launch/evaluate.py, before any work."""
    ev = cfg.eval
    if ev.mode not in MODES:
        raise ConfigError(f"eval.mode={ev.mode!r} is not one of {MODES}")
    family = family_class(cfg.model.family)
    if family.data_kind == "text":
        raise ConfigError(
            f"model.family={cfg.model.family}: the evaluation job does not take text-to-image families yet (its "
            "samples are drawn for class labels or ControlNet conditions, not for prompts); sample the exported "
            "pipeline (export/ema) directly"
        )
    if ev.sampler not in ("", *family.samplers):
        raise ConfigError(
            f"eval.sampler={ev.sampler!r} is not one of model.family={cfg.model.family}'s samplers {family.samplers} "
            "(or empty: the family's own)"
        )
    if ev.mode == "denoising" and family_entry(cfg.model.family).noise_process != "ddpm":
        raise ConfigError(
            f"eval.mode=denoising measures the error per band of DDPM timesteps (eval.bands); model.family="
            f"{cfg.model.family} trains in continuous sigma: use eval.mode=metrics, replacement or drift"
        )
    if not ev.out:
        raise ConfigError("eval.out must be set: the folder of the samples, results and plots, e.g. eval.out=runs/eval")
    needs = {"metrics": ("model", "reference"), "replacement": ("model", "reference", "pretrained"),
             "denoising": ("models", "reference"), "drift": ("model", "pretrained")}[ev.mode]  # fmt: skip
    if takes_eval_set(cfg):
        check_conditioned_config(cfg)
        needs = tuple(key for key in needs if key != "pretrained")  # drift: from where training started by default
    missing = [f"eval.{key}" for key in needs if not getattr(ev, key)]
    if missing:
        raise ConfigError(f"eval.mode={ev.mode} needs {', '.join(missing)} set, e.g. `{missing[0]}=/path/to/...`")
    for key in ("num_samples", "sample_steps", "samples_per_shard", "kid_subsets", "kid_subset_size", "pr_neighbours"):
        if getattr(ev, key) < 1:
            raise ConfigError(f"eval.{key}={getattr(ev, key)} must be at least 1")
    if ev.handover_labels not in ("null", "same"):
        raise ConfigError(f"eval.handover_labels={ev.handover_labels!r} is not one of ('null', 'same')")
    if any(not 0.0 <= p <= 1.0 for p in ev.handover):
        raise ConfigError(f"eval.handover={list(ev.handover)}: every share p must lie in [0, 1] (1 = all steps)")
    if ev.mode in ("metrics", "replacement"):
        check_feature_source(ev)  # a missing weights file stops the job before any sampling


def evaluate(cfg: Config) -> dict:
    check_eval_config(cfg)
    rank, world, device = distributed.init()
    Path(cfg.eval.out).mkdir(parents=True, exist_ok=True)
    if cfg.eval.mode in ("denoising", "drift"):
        from trainer.evaluation.analyses import denoising_mode, drift_mode

        mode = denoising_mode if cfg.eval.mode == "denoising" else drift_mode
        return mode(cfg, rank, world, device)
    return sample_metrics(cfg, rank, world, device)


def class_count(cfg: Config, family, reference: ImageSet) -> int:
    """eval.num_classes, else the reference's classes, else the model's whole label space."""
    count = cfg.eval.num_classes or len(reference.classes or []) or family.null_condition
    if count > family.null_condition:
        raise ConfigError(
            f"{count} classes to sample (eval.num_classes or the reference's classes) but the model has "
            f"{family.null_condition}: set eval.num_classes <= {family.null_condition}"
        )
    return count


def handover_steps(share: float, num_steps: int) -> int:
    return round(share * num_steps)


def sample_metrics(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    ev, out = cfg.eval, Path(cfg.eval.out)
    extractor = load_extractor(ev, device)
    family, denoiser = load_model(cfg, ev.model, "eval.model", device)
    size = image_size_of(family)
    conditions = None
    if takes_eval_set(cfg):
        conditions = open_condition_set(ev.data, family, size, "eval.data", cfg.data.verify)
    reference = open_image_set(ev.reference, family, size, verify=cfg.data.verify)
    settings = {
        "num_samples": ev.num_samples, "samples_per_shard": ev.samples_per_shard, "batch_size": ev.batch_size,
        "sampler": ev.sampler or family.samplers[0], "num_steps": ev.sample_steps, "guidance_scale": ev.cfg_scale,
        "seed": ev.seed,
        "sample_shape": list(family.sample_shape),
    }  # fmt: skip
    if conditions is None:
        settings["num_classes"] = class_count(cfg, family, reference)
    else:  # the samples' bytes depend on the evaluation set: another one is refused in the same eval.out
        settings |= {"eval_data_sha256": conditions.fingerprint, "num_eval_entries": len(conditions)}
    fine_tuned = Denoiser(family, denoiser)
    chains = {None: [(fine_tuned, ev.sample_steps)]}
    if ev.mode == "replacement":
        pre_family, pre_denoiser = load_model(cfg, ev.pretrained, "eval.pretrained", device)
        if tuple(pre_family.sample_shape) != tuple(family.sample_shape):
            raise ConfigError(
                f"eval.pretrained samples {pre_family.sample_shape} but eval.model {family.sample_shape}: "
                "the replacement curve needs the pre-trained model of this fine-tuned one"
            )
        pretrained = Denoiser(pre_family, pre_denoiser, null=ev.handover_labels == "null")
        chains = {}
        for share in ev.handover:
            late = handover_steps(share, ev.sample_steps)
            chains[share] = [(fine_tuned, ev.sample_steps - late), (pretrained, late)]
    say = print if rank == 0 else (lambda message: None)
    real, cached = reference_features(reference, extractor, size, ev.cache, ev.batch_size, rank, world, device)
    say(f"evaluate: reference {ev.reference}: {reference.num_images} images ({'cached' if cached else 'computed'})")
    rows = {}
    for share, chain in chains.items():
        name = "samples" if share is None else f"handover_{round(100 * share):03d}"
        chain = [(model, steps) for model, steps in chain if steps > 0]
        folder = write_sample_set(
            out / name, chain, settings, rank=rank, world=world, device=device, log=say, conditions=conditions
        )
        samples = open_image_set(str(folder), family, size, key="eval.out", verify="size")
        fake = set_features(samples, extractor, size, ev.batch_size, rank, world, device)
        if rank == 0:
            rows[name] = {"handover": share, **all_metrics(real, fake, ev)}
            write_grid(samples, ev.grid_images, out / f"grid_{name}.png", grid_controls(conditions, ev.grid_images))
    results = {"mode": ev.mode, "model": ev.model, "pretrained": ev.pretrained, "reference": ev.reference,
               "data": ev.data if conditions is not None else None,
               "features": ev.inception or ev.feature_net, "num_reference": reference.num_images, **settings,
               "results": rows}  # fmt: skip
    if rank == 0:
        atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
        print(metrics_table(rows), flush=True)
        if ev.mode == "replacement":
            plot_replacement(rows, out / "replacement.png")
    distributed.barrier()
    return results


def metrics_table(rows: dict[str, dict]) -> str:
    lines = [f"{'samples':16}" + "".join(f"{name:>12}" for name in METRIC_NAMES)]
    for name, row in rows.items():
        lines.append(f"{name:16}" + "".join(f"{row[metric]:12.5g}" for metric in METRIC_NAMES))
    return "\n".join(lines)


def grid_controls(conditions, num_images: int) -> list[torch.Tensor]:
    """The image-like conditions (control maps) of the first samples, shown beside them in the grid."""
    if conditions is None or num_images <= 0:
        return []
    return image_maps(conditions.read([conditions.entry_of(i) for i in range(num_images)]))


def write_grid(
    images: ImageSet, num_images: int, path: Path, beside: list[torch.Tensor] = (), min_side: int = 64
) -> None:
    """The first samples (each right of its `beside` images: its control), nearest-upscaled so that a 16 px sample
    shows at least `min_side` px wide."""
    if num_images <= 0:
        return
    batch = images.read(range(min(num_images, images.num_images)))
    batch = torch.cat([*(maps[: len(batch)] for maps in beside), batch], dim=-1)
    grid = Image.fromarray(image_grid(batch.float() / 127.5 - 1, columns=math.ceil(math.sqrt(len(batch)))))
    scale = max(1, math.ceil(min_side / batch.shape[-1]))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def plot_replacement(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [100 * row["handover"] for row in rows.values()]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(shares, [row["fid"] for row in rows.values()], marker="o")
    axis.set_xlabel("last p% of the reverse steps by the pre-trained model")
    axis.set_ylabel("FID")
    axis.set_title("chain of forgetting")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
