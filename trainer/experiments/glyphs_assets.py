"""Builds the glyph experiment's models into `assets/glyphs/`, beside the data set (`glyphs_data.py`).

- `feature_net.pt`: the small CNN of `models/feature_net.py` trained on both scripts: a class head over the 52
  Latin letters and the 10 Greek capitals (ids 0-51, then 52-61) and a font head over every face, so its 64-d
  embedding (the experiment's Fréchet feature space) sees both what letter it is and how it is drawn. It trains on
  the source faces but every tenth one, on target_train and on target_val, with 1-pixel shifts; its accuracy on the
  held-out source faces, on target_heldout and on the control face is in `models_info.json`.
- `source_model/`: a pixel-space DiT (16x16x3, patch 2, 6 blocks of width 128, learned sigma, 2.2M parameters)
  pre-trained on all 15,496 source images (`shipped_models.py`'s recipe); the EMA weights are saved.
- `source_samples.png` (rows: the 52 letters, DDIM-50, CFG 1.5) and `models_info.json`: settings, times and the first
  gate of the experiment, measured here, before any comparison: the source model's samples must be classified as
  their letter at least 90% of the time and be within 3x the real-vs-real Fréchet floor.

    DS_ACCELERATOR=cpu .venv/bin/python launch/make_glyph_assets.py --overwrite --threads 2 [--size 24]

A killed run resumes from its checkpoint in the temporary sibling folder when rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from models.feature_net import FeatureNet, frechet_distance, nhwc_to_nchw, save_feature_net
from trainer.experiments import glyphs_data
from trainer.experiments.shipped_models import (
    SourceRecipe,
    fit_classifier,
    sample_images,
    save_grid,
    save_source_model,
    source_family,
    train_source_model,
)

SIZE = 16  # the shipped models' image side (`--size` builds another; docs/experiments.md has the 24 px attempt)
PATCH = {16: 2, 24: 3, 32: 4}  # 8x8 tokens at every size: a larger image costs about the same compute
NUM_LATIN, NUM_GREEK = len(glyphs_data.LATIN), len(glyphs_data.GREEK)


def glyph_dit(size: int = SIZE) -> dict:
    """The source DiT's config for `size` px images."""
    return dict(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=3,
        out_channels=6,  # epsilon and the learned variance interpolation, as DiT
        num_layers=6,
        sample_size=size,
        patch_size=PATCH[size],
        num_embeds_ada_norm=NUM_LATIN,  # the null class is id 52
        norm_num_groups=1,
    )


GLYPH_DIT = glyph_dit()
GATE_ACCURACY, GATE_FID_RATIO = 0.90, 3.0


def font_ids(split: str, size: int = SIZE) -> np.ndarray:
    """Each image's face as an index into the data set's face list (the font head's classes)."""
    names = glyphs_data.load_glyph_fonts(split, size)
    return np.searchsorted(font_table(size), names)


def font_table(size: int = SIZE) -> np.ndarray:
    return np.unique(np.concatenate([glyphs_data.load_glyph_fonts(s, size) for s in glyphs_data.SPLITS]))


def classifier_splits(size: int = SIZE) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 NCHW images, class ids over both scripts, font ids) of the classifier's train and held-out sets."""

    def part(split: str, offset: int, keep: np.ndarray | None = None):
        images, labels = glyphs_data.load_glyphs(split, size)
        fonts = font_ids(split, size)
        keep = np.ones(len(labels), bool) if keep is None else keep
        return nhwc_to_nchw(images[keep]), torch.from_numpy(labels[keep] + offset), torch.from_numpy(fonts[keep])

    source_fonts = font_ids("source", size)
    held_fonts = np.unique(source_fonts)[::10]
    held = np.isin(source_fonts, held_fonts)
    train = [part("source", 0, ~held), part("target_train", NUM_LATIN), part("target_val", NUM_LATIN)]
    return {
        "train": tuple(torch.cat(column) for column in zip(*train)),
        "source_heldout_faces": part("source", 0, held),
        "target_heldout": part("target_heldout", NUM_LATIN),
        "control": part("control", 0),
    }


def train_feature_net(seed: int, steps: int, batch_size: int = 256, size: int = SIZE) -> tuple[FeatureNet, dict]:
    torch.manual_seed(seed)
    splits = classifier_splits(size)
    images, classes, fonts = splits["train"]
    net = FeatureNet(num_classes=NUM_LATIN + NUM_GREEK, num_attributes=len(font_table(size)), num_features=64)
    net = fit_classifier(net, images, classes, steps, batch_size, seed, fonts, attribute_weight=0.5)
    accuracy = {name: class_accuracy(net, x, y) for name, (x, y, _) in splits.items()}
    return net, accuracy


@torch.no_grad()
def class_accuracy(net: FeatureNet, images: torch.Tensor, classes: torch.Tensor) -> float:
    """The share of images whose argmax over all 62 classes (both scripts) is their class."""
    logits, _ = net.heads(images)
    return round(float((logits.argmax(1) == classes).float().mean()), 4)


def source_draw(batch_size: int, size: int = SIZE):
    images, labels = glyphs_data.load_glyphs("source", size)
    x_all = nhwc_to_nchw(images).float() / 127.5 - 1.0
    y_all = torch.from_numpy(labels)

    def draw(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        return x_all[index], y_all[index]

    return draw


def balanced_real(per_class: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of `per_class` real source images of every letter (uint8 NCHW)."""
    images, labels = glyphs_data.load_glyphs("source", size)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[: 2 * per_class] for c in range(NUM_LATIN)]
    first = np.concatenate([p[:per_class] for p in picks])
    second = np.concatenate([p[per_class:] for p in picks])
    return nhwc_to_nchw(images[first]), nhwc_to_nchw(images[second])


def sample_gate(net: FeatureNet, model: torch.nn.Module, per_class: int, seed: int, cfgs: tuple[float, ...]) -> dict:
    """Gate 1: the letter accuracy of the source model's samples and their Fréchet distance to real source images,
    against the floor of two real sets of the same size (all class-balanced)."""
    family = source_family(model)
    labels = torch.arange(NUM_LATIN).repeat_interleave(per_class)
    real_a, real_b = balanced_real(per_class, seed, family.sample_shape[-1])
    floor = frechet_distance(net, real_a, real_b)
    gate: dict = {"images_per_side": len(labels), "fid_real_vs_real": round(floor, 3)}
    for cfg in cfgs:
        samples = nhwc_to_nchw(sample_images(family, labels, seed=seed + 1, guidance_scale=cfg))
        fid = frechet_distance(net, real_a, samples)
        accuracy = class_accuracy(net, samples, labels)
        gate[f"cfg_{cfg}"] = {
            "accuracy": accuracy, "fid": round(fid, 3), "fid_over_floor": round(fid / floor, 2),
            "passes": accuracy >= GATE_ACCURACY and fid <= GATE_FID_RATIO * floor,
        }  # fmt: skip
    return gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(glyphs_data.ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8000, help="source model training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--feature-steps", type=int, default=3000)
    parser.add_argument("--gate-per-class", type=int, default=20, help="samples per letter for the gate")
    parser.add_argument("--size", type=int, default=SIZE, choices=sorted(PATCH), help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace the models already in --out")
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "source_model").exists() and not args.overwrite:
        raise SystemExit(f"error: {out / 'source_model'} exists; pass --overwrite to rebuild it")
    torch.set_num_threads(args.threads)
    # Built into a temporary sibling (which also holds the checkpoint) and moved in at the end.
    tmp = out.with_name(f".{out.name}.models.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    info: dict = {"seed": args.seed, "image_size": args.size, "torch_threads": torch.get_num_threads()}

    start = time.time()
    net, accuracy = train_feature_net(args.seed, args.feature_steps, size=args.size)
    info["feature_net"] = {
        **net.config, "steps": args.feature_steps, "seconds": round(time.time() - start, 1), "accuracy": accuracy,
    }  # fmt: skip
    print(json.dumps(info["feature_net"]), flush=True)
    save_feature_net(net, tmp / "feature_net.pt")

    config = glyph_dit(args.size)
    recipe = SourceRecipe(config, args.seed, args.steps, args.batch_size, args.lr, extra={"data": f"glyphs{args.size}"})

    def on_log(step: int, ema: torch.nn.Module) -> None:
        if step % 2000 == 0 and step < args.steps:
            print(f"gate at step {step}: {json.dumps(sample_gate(net, ema, 10, args.seed, (1.0,)))}", flush=True)

    checkpoint = tmp / "source_checkpoint.pt"
    model, seconds = train_source_model(recipe, source_draw(args.batch_size, args.size), on_log, checkpoint)
    info["source_model"] = {
        "config": config, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seconds": round(seconds, 1), "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    save_source_model(model, tmp / "source_model")
    grid = sample_images(source_family(model), torch.arange(NUM_LATIN).repeat_interleave(10), args.seed + 1, 50, 1.5)
    save_grid(grid, tmp / "source_samples.png", columns=10, scale=4)
    info["gate_source_samples"] = sample_gate(net, model, args.gate_per_class, args.seed, (1.0, 1.5))
    (tmp / "models_info.json").write_text(json.dumps(info, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("feature_net.pt", "source_model", "source_samples.png", "models_info.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        (tmp / name).replace(target)
    tmp.rmdir()
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
