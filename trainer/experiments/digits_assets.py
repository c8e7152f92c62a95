"""Builds `assets/digits/`, what the digits experiment (launch/experiment_digits.py) ships with.

- `source_model/`: a small pixel-space DiT (8x8x3, patch 2, 4 blocks of width 64, learned sigma) pre-trained on
  the training pool of digits 0-4 (`data/digits.py`) with DiT's own objective (`trainer.loss.diffusion_loss`,
  linear betas 1e-4..0.02, 1000 steps) and 10% label dropout to the null class; the EMA weights are saved.
- `classifier.pt`: the small CNN of `models/feature_net.py` trained to tell the ten digits apart on the training
  pools of all digits (with 1-pixel shifts); its 32-d embedding is the experiment's Fréchet feature space and its
  argmax the accuracy of samples. Its held-out accuracy is in `info.json`.
- `source_samples.png`: DDIM-50 samples of the source model (rows: digits 0-4); `info.json`: settings, times.

    DS_ACCELERATOR=cpu .venv/bin/python launch/make_digits_assets.py --overwrite
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from data import digits
from models.feature_net import FeatureNet, nhwc_to_nchw, save_feature_net
from trainer.experiments.shipped_models import (
    Draw,
    SourceRecipe,
    fit_classifier,
    sample_images,
    save_grid,
    save_source_model,
    shifted,
    source_family,
    train_source_model,
)

SOURCE_DIT = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=3,
    out_channels=6,
    num_layers=4,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=len(digits.SOURCE_DIGITS),
    norm_num_groups=1,
)


def source_draw(batch_size: int) -> Draw:
    images, labels = digits.split(digits.SOURCE_DIGITS, "pool")
    x_all = nhwc_to_nchw(images).float() / 127.5 - 1.0
    y_all = torch.from_numpy(labels)

    def draw(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        return shifted(x_all[index], generator), y_all[index]

    return draw


def train_classifier(seed: int, steps: int, batch_size: int = 128) -> FeatureNet:
    torch.manual_seed(seed)
    every = digits.SOURCE_DIGITS + digits.TARGET_DIGITS
    images, labels = digits.split(every, "pool")
    x_all, y_all = nhwc_to_nchw(images), torch.from_numpy(labels)
    net = FeatureNet(num_classes=len(every), num_attributes=1)  # the attribute head is unused here
    return fit_classifier(net, x_all, y_all, steps, batch_size, seed)


@torch.no_grad()
def heldout_accuracy(net: FeatureNet, digit_set: tuple[int, ...]) -> float:
    images, labels = digits.split(digit_set, "heldout")
    logits, _ = net.heads(nhwc_to_nchw(images))
    return round(float((logits.argmax(1) == torch.from_numpy(labels)).float().mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="source model training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to rebuild it")
    torch.set_num_threads(args.threads)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict = {"seed": args.seed, "split_seed": digits.SPLIT_SEED, "torch_threads": torch.get_num_threads()}

    start = time.time()
    net = train_classifier(args.seed, args.classifier_steps)
    info["classifier"] = {**net.config, "steps": args.classifier_steps, "seconds": round(time.time() - start, 1)}
    info["classifier"]["heldout_accuracy"] = {
        "digits 0-4": heldout_accuracy(net, digits.SOURCE_DIGITS),
        "digits 5-9": heldout_accuracy(net, digits.TARGET_DIGITS),
    }
    save_feature_net(net, tmp / "classifier.pt")

    start = time.time()
    recipe = SourceRecipe(SOURCE_DIT, args.seed, args.steps, args.batch_size, args.lr, warmup=100)
    model, _ = train_source_model(recipe, source_draw(args.batch_size))
    info["source_model"] = {
        "config": SOURCE_DIT, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seconds": round(time.time() - start, 1), "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    save_source_model(model, tmp / "source_model")
    family = source_family(model)
    grid_labels = torch.arange(len(digits.SOURCE_DIGITS)).repeat_interleave(10)
    samples = sample_images(family, grid_labels, seed=args.seed + 1)
    save_grid(samples, tmp / "source_samples.png", columns=10, scale=6)
    logits, _ = net.heads(nhwc_to_nchw(samples))
    predicted = np.asarray(digits.SOURCE_DIGITS)[grid_labels.numpy()]
    info["source_model"]["sample_accuracy"] = round(float((logits.argmax(1).numpy() == predicted).mean()), 4)
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
