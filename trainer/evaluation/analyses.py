"""The forgetting analyses without sampling: denoising error by noise level, and parameter drift (L2-EWC).

Denoising error: every model sees the same noisy inputs (sample i's timestep in each band and its noise come from
(eval.seed, i, band)), held-out target samples with their own condition (DiT: class; SD + ControlNet: caption and
control) and bank samples with the null condition (the null class; the default prompt, control kept), spread over
the ranks like the features are. Drift: sum (theta - theta_pre)^2 over the parameters both models share, in total
and per block; label tables are reported apart, as a transfer's label rows need not mean the same classes. For
SD + ControlNet both are about the ControlNet, the module that trains; drift is measured by default from where
training started (model.sd_controlnet.controlnet, else the ControlNet `from_unet` makes of model.pretrained).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from data.files import atomic_write_bytes
from data.shard_jobs import derived_seed, owned_shards, shard_ranges
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.evaluation.data import FEATURE_CHUNK, image_size_of, open_condition_set, read_fields
from trainer.evaluation.sampling import load_model
from trainer.loss import NoiseSchedule

LABEL_TABLE = "class_embedder.embedding_table"


def named_models(entries: list[str]) -> dict[str, str]:
    """`name=path` or `path` (named by its folder) -> {name: path}."""
    models = {}
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        models[name or Path(path.rstrip("/")).name] = path
    return models


@torch.no_grad()
def denoising_errors(
    family, model: torch.nn.Module, dataset, num: int, null_labels: bool, bands: list[tuple[int, int]], seed: int,
    batch_size: int, rank: int, world: int, device: torch.device,
) -> list[float]:  # fmt: skip
    """Mean ε-MSE of `model` on the first `num` samples of a shard set, per timestep band (a collective)."""
    schedule = NoiseSchedule(family.betas())
    errors = torch.zeros((num, len(bands)), dtype=torch.float64, device=device)
    chunks = shard_ranges(num, FEATURE_CHUNK)
    for j in owned_shards(len(chunks), rank, world):
        for start in range(chunks[j].start, chunks[j].stop, batch_size):
            batch = range(start, min(start + batch_size, chunks[j].stop))
            fields = read_fields(dataset, batch, ("x", *family.condition_fields))
            x0 = fields.pop("x").float().to(device)
            null = torch.full((len(batch),), null_labels, dtype=torch.bool)  # on the host: the family reads it there
            condition = family.condition({name: v.to(device) for name, v in fields.items()}, null)
            for b, (low, high) in enumerate(bands):
                generators = [torch.Generator().manual_seed(derived_seed(seed, i, b)) for i in batch]
                t = torch.tensor([int(torch.randint(low, high, (1,), generator=g)) for g in generators])
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
                t = t.to(device)
                epsilon = family.predict(model, schedule.add_noise(x0, noise, t), t, condition)[:, : x0.shape[1]]
                errors[batch.start : batch.stop, b] = ((epsilon - noise) ** 2).flatten(1).mean(1).double()
    return distributed.all_reduce_sum(errors).mean(0).tolist()


def denoising_mode(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    ev, out = cfg.eval, Path(cfg.eval.out)
    edges = list(ev.bands)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"eval.bands={edges} must be at least two increasing timestep edges, e.g. [0,100,1000]")
    bands = list(zip(edges, edges[1:]))
    sets = {"target": (ev.reference, False)}
    if cfg.data.bank:
        sets["bank"] = (cfg.data.bank, True)
    models = named_models(list(ev.models))
    errors: dict[str, dict[str, list[float]]] = {}
    datasets = {}
    for name, path in models.items():
        family, model = load_model(cfg, path, "eval.models", device)
        if not datasets:  # checked against the first model: every model of the comparison samples the same space
            keys = {"target": "eval.reference", "bank": "data.bank"}
            datasets = {
                domain: open_condition_set(folder, family, image_size_of(family), keys[domain], cfg.data.verify, True)
                .dataset for domain, (folder, _) in sets.items()
            }  # fmt: skip
        if edges[-1] > len(family.betas()):
            raise ConfigError(f"eval.bands ends at {edges[-1]} but {path} has {len(family.betas())} timesteps")
        errors[name] = {
            domain: denoising_errors(
                family, model, datasets[domain], min(ev.num_samples, len(datasets[domain])), null, bands, ev.seed,
                ev.batch_size, rank, world, device,
            )
            for domain, (_, null) in sets.items()
        }  # fmt: skip
    labels = [f"t {low}-{high}" for low, high in bands]
    results = {"mode": "denoising", "bands": labels, "models": models, "sets": {k: v[0] for k, v in sets.items()},
               "errors": errors}  # fmt: skip
    if rank == 0:
        atomic_write_bytes(out / "denoising.json", (json.dumps(results, indent=2) + "\n").encode())
        for domain in sets:
            condition = "null condition" if sets[domain][1] else "own condition"
            print(f"\nε-MSE on {domain} ({condition}), by noise level")
            print(f"{'model':16}" + "".join(f"{band:>12}" for band in labels))
            for name in models:
                print(f"{name:16}" + "".join(f"{e:12.4f}" for e in errors[name][domain]))
        plot_denoising(errors, labels, out / "denoising.png")
    distributed.barrier()
    return results


def plot_denoising(errors: dict[str, dict[str, list[float]]], bands: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(next(iter(errors.values())))
    figure, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.5), squeeze=False)
    for axis, domain in zip(axes[0], domains, strict=True):
        for name, by_domain in errors.items():
            axis.plot(bands, by_domain[domain], marker="o", label=name)
        axis.set_title(f"denoising error on {domain}")
        axis.set_xlabel("timestep band")
        axis.set_ylabel("ε-MSE")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def group_of(name: str) -> str:
    """transformer_blocks.3.attn1.to_q.weight -> transformer_blocks.3; pos_embed.proj.weight -> pos_embed."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


@torch.no_grad()
def parameter_drift(model: torch.nn.Module, pretrained: torch.nn.Module) -> dict:
    """L2-EWC = sum (theta - theta_pre)^2: total and per group over the shared parameters; label tables apart."""
    reference = dict(pretrained.named_parameters())
    groups: dict[str, float] = defaultdict(float)
    label_tables, skipped, total = {}, [], 0.0
    for name, theta in model.named_parameters():
        theta_pre = reference.get(name)
        if theta_pre is None or theta_pre.shape != theta.shape:
            skipped.append(name)
            continue
        drift = float(((theta.double() - theta_pre.double()) ** 2).sum())
        if LABEL_TABLE in name:
            label_tables[name] = drift
            continue
        groups[group_of(name)] += drift
        total += drift
    return {"l2_ewc": total, "groups": dict(groups), "label_tables": label_tables, "not_compared": skipped}


def drift_start(cfg: Config) -> str:
    """What drift is measured from: eval.pretrained; for SD + ControlNet by default where training started (the
    ControlNet of model.sd_controlnet.controlnet, else the one `from_unet` makes of model.pretrained, seeded with
    train.seed)."""
    return cfg.eval.pretrained or cfg.model.sd_controlnet.controlnet or cfg.model.pretrained


def drift_mode(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    ev, start = cfg.eval, drift_start(cfg)
    _, model = load_model(cfg, ev.model, "eval.model", torch.device("cpu"))
    _, pretrained = load_model(cfg, start, "eval.pretrained", torch.device("cpu"))
    results = {"mode": "drift", "model": ev.model, "pretrained": start, **parameter_drift(model, pretrained)}
    if rank == 0:
        atomic_write_bytes(Path(ev.out) / "drift.json", (json.dumps(results, indent=2) + "\n").encode())
        print(f"{'parameters':28}{'L2-EWC':>14}")
        for name, value in results["groups"].items():
            print(f"{name:28}{value:14.6g}")
        print(f"{'total':28}{results['l2_ewc']:14.6g}")
        for name, value in results["label_tables"].items():
            print(f"{name:28}{value:14.6g}  (label table, not in the total)")
        if results["not_compared"]:
            print(f"not compared (absent or other shape): {', '.join(results['not_compared'])}")
    distributed.barrier()
    return results
