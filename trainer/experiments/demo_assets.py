"""Builds `assets/demo/`, the weights the embedded demo ships with, so that the demo needs no download and no GPU.

- `source_model/`: a tiny pixel-space DiT (diffusers `DiTTransformer2DModel`, learned sigma, `transformer/` and
  `scheduler/`) pre-trained on the SOURCE procedural domain of `data/procedural.py` with DiT's own objective
  (`trainer.loss.diffusion_loss`, linear betas 1e-4..0.02, 1000 steps) and 10% label dropout to the null class.
  The EMA weights are saved.
- `feature_net.pt`: the small CNN of `models/feature_net.py`, trained to classify (domain x shape) and corrupted
  images and to regress each image's attributes; its 32-d embedding is the demo's FID feature space.
- `source_samples.png`: a grid of DDIM-50 samples of the source model (rows: classes); `info.json`: the configs,
  training times and the sanity Fréchet distances printed at the end.

How the shipped assets were made (see `info.json` for the exact numbers):
    DS_ACCELERATOR=cpu .venv/bin/python launch/make_demo_assets.py --overwrite --threads 2
with the defaults below: seed 0, 2 torch threads on an otherwise idle 2-core CPU; feature net 600 steps of
batch 256 (23 s); source DiT 6000 steps of batch 64, AdamW lr 3e-3 (200 warm-up steps, cosine to 3e-4), grad-norm
clip 1, EMA 0.999 (1071 s, about 18 min). The source domain is broad, so 6000 steps leave the model imperfect
(FID 12 to source images, 1.3 between two real sets): like a real pre-trained model, not a perfect one.
DiT's adaLN-Zero initialisation and the 3e-3 learning rate are what make so few steps enough: with diffusers'
default init and 1e-3, samples were still shapeless blobs after 1500 steps.
A killed run resumes from its checkpoint when rerun. CPU float reductions depend on the machine and thread count,
so a rerun gives close, not bit-identical, weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data import procedural
from models.dit import DiTFamily
from models.feature_net import FeatureNet, frechet_distance, nhwc_to_nchw, save_feature_net
from trainer.experiments.shipped_models import (
    Draw,
    SourceRecipe,
    sample_images,
    save_grid,
    save_source_model,
    source_family,
    train_source_model,
)

IMAGE_SIZE = 16
SOURCE_DIT = dict(
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=3,
    out_channels=6,  # epsilon and the learned variance interpolation, as DiT
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=procedural.NUM_CLASSES,  # the null class is id NUM_CLASSES (the table's extra row)
    norm_num_groups=1,  # unused by DiT's blocks; kept consistent with the test models
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000, help="source model training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--feature-steps", type=int, default=600, help="feature net training steps")
    parser.add_argument("--num-fid", type=int, default=1000, help="images per side of each sanity FID")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--progress-dir", help="if set, a sample grid is written there every 1000 steps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to rebuild it")
    torch.set_num_threads(args.threads)
    # Build into a temporary sibling and swap it in at the end: a failed run never leaves half an asset folder.
    # The sibling also holds the training checkpoint, so rerunning the same command after a kill resumes.
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    info: dict = {"seed": args.seed, "image_size": IMAGE_SIZE, "torch_threads": torch.get_num_threads()}

    start = time.time()
    net = train_feature_net(args.seed, args.feature_steps)
    info["feature_net"] = {**net.config, "steps": args.feature_steps, "seconds": round(time.time() - start, 1)}
    info["feature_net"]["held_out_accuracy"] = feature_net_accuracy(net, args.seed)
    save_feature_net(net, tmp / "feature_net.pt")

    checkpoint = tmp / "source_checkpoint.pt"
    recipe = SourceRecipe(SOURCE_DIT, args.seed, args.steps, args.batch_size, args.lr)
    draw = source_draw(args.batch_size)
    model, seconds = train_source_model(recipe, draw, progress_grids(args.progress_dir), checkpoint)
    info["source_model"] = {
        "config": SOURCE_DIT,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_source_model(model, tmp / "source_model")
    family = source_family(model)
    grid_labels = torch.arange(procedural.NUM_CLASSES).repeat_interleave(8)
    save_grid(sample_images(family, grid_labels, seed=args.seed + 1), tmp / "source_samples.png", columns=8)
    info["fid"] = sanity_fids(net, family, args.seed, args.num_fid)
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(info, indent=2))


# --- the source model ---------------------------------------------------------------------------------------------
def source_draw(batch_size: int) -> Draw:
    def draw(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Procedural data is unlimited: a fresh batch per step means the model cannot memorise its training set.
        images, labels = procedural.make_images("source", batch_size, seed=1_000_000 + step, size=IMAGE_SIZE)
        return nhwc_to_nchw(images).float() / 127.5 - 1.0, torch.from_numpy(labels)

    return draw


def progress_grids(folder: str | None) -> Callable[[int, torch.nn.Module], None] | None:
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)

    def on_log(step: int, ema: torch.nn.Module) -> None:
        if step % 1000 == 0:
            family = source_family(ema)
            labels = torch.arange(procedural.NUM_CLASSES).repeat_interleave(8)
            save_grid(sample_images(family, labels, seed=1), Path(folder) / f"step_{step:06d}.png", columns=8)

    return on_log


# --- the feature net ----------------------------------------------------------------------------------------------
def feature_training_batch(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (uint8 NCHW), class ids (domain * NUM_CLASSES + shape, or the last id for corrupted images),
    attribute targets and a mask of the images whose attributes are defined (the clean ones)."""
    rng = np.random.default_rng(seed)
    images, classes, attributes = [], [], []
    for index, domain in enumerate(procedural.DOMAINS):
        values = procedural.sample_attributes(domain, num, seed)
        images.append(procedural.render(values, IMAGE_SIZE))
        classes.append(index * procedural.NUM_CLASSES + values["labels"])
        attributes.append(procedural.normalised_attributes(values))
    clean = np.concatenate(images)
    corrupted = corrupt(clean[rng.permutation(len(clean))[: num // 2]], rng)
    corrupted_class = len(procedural.DOMAINS) * procedural.NUM_CLASSES
    all_images = np.concatenate([clean, corrupted])
    all_classes = np.concatenate([*classes, np.full(len(corrupted), corrupted_class)])
    all_attributes = np.concatenate([*attributes, np.zeros((len(corrupted), len(procedural.ATTRIBUTE_NAMES)))])
    mask = np.arange(len(all_images)) < len(clean)
    return (
        nhwc_to_nchw(all_images),
        torch.from_numpy(all_classes).long(),
        torch.from_numpy(all_attributes).float(),
        torch.from_numpy(mask),
    )


def corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a poor generator produces: noise, blur, blends of two images, or pure noise (a quarter each)."""
    x = images.astype(np.float32) / 255.0
    kind = rng.integers(0, 4, len(x))
    noisy = x + rng.normal(0, 1, x.shape) * rng.uniform(0.08, 0.4, (len(x), 1, 1, 1))
    half = IMAGE_SIZE // 2
    blurred = x.reshape(len(x), half, 2, half, 2, 3).mean(axis=(2, 4)).repeat(2, axis=1).repeat(2, axis=2)
    blended = 0.5 * (x + x[rng.permutation(len(x))])
    pure = rng.uniform(0, 1, (len(x), 1, 1, 3)) + rng.normal(0, 1, x.shape) * rng.uniform(0.1, 0.5, (len(x), 1, 1, 1))
    out = np.select([k == kind[:, None, None, None] for k in range(4)], [noisy, blurred, blended, pure])
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def train_feature_net(seed: int, steps: int, batch_size: int = 256) -> FeatureNet:
    torch.manual_seed(seed)
    net = FeatureNet(num_classes=len(procedural.DOMAINS) * procedural.NUM_CLASSES + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    images, classes, attributes, mask = feature_training_batch(8000, seed + 17)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        logits, predicted = net.heads(images[index])
        regression = ((predicted - attributes[index]) ** 2).mean(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, classes[index])
        loss = loss + 10.0 * (regression * mask[index]).sum() / mask[index].sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"feature net step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def feature_net_accuracy(net: FeatureNet, seed: int) -> float:
    images, classes, _, _ = feature_training_batch(1000, seed + 99)
    logits, _ = net.heads(images)
    return round(float((logits.argmax(dim=1) == classes).float().mean()), 4)


# --- sanity numbers -----------------------------------------------------------------------------------------------
def sanity_fids(net: FeatureNet, family: DiTFamily, seed: int, num: int) -> dict[str, float]:
    """The Fréchet distances that say whether the assets make a meaningful demo."""

    def real(domain: str, offset: int) -> torch.Tensor:
        return nhwc_to_nchw(procedural.make_images(domain, num, seed=seed + offset, size=IMAGE_SIZE)[0])

    source_a, target_a, target_b = real("source", 101), real("target", 102), real("target", 103)
    source_b = real("source", 104)
    labels = torch.arange(num) % procedural.NUM_CLASSES
    samples = nhwc_to_nchw(sample_images(family, labels, seed=seed + 2))
    noise = torch.randint(0, 256, source_a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    fids = {
        "target_real_vs_target_real": frechet_distance(net, target_a, target_b),
        "source_real_vs_source_real": frechet_distance(net, source_a, source_b),
        "source_real_vs_target_real": frechet_distance(net, source_a, target_a),
        "source_samples_vs_source_real": frechet_distance(net, source_a, samples),
        "source_samples_vs_target_real": frechet_distance(net, target_a, samples),
        "noise_vs_source_real": frechet_distance(net, source_a, noise),
    }
    fids = {key: round(value, 3) for key, value in fids.items()}
    fids["num_images_per_side"] = num
    return fids


if __name__ == "__main__":
    main()
