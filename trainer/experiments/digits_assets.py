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
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from data import digits
from models.dit import DiTFamily
from models.feature_net import FeatureNet, nhwc_to_nchw, save_feature_net
from trainer.experiments.demo_assets import SCHEDULE, dit_initialise, sample_images, save_grid
from trainer.loss import NoiseSchedule, diffusion_loss

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


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to one pixel (zero-filled): cheap augmentation for 450-900 training images."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), value=float(images.min()))
    dx, dy = torch.randint(0, 3, (2, len(images)), generator=generator)
    size = images.shape[-1]
    return torch.stack([p[:, y : y + size, x : x + size] for p, x, y in zip(padded, dx.tolist(), dy.tolist())])


def train_source_model(seed: int, steps: int, batch_size: int, lr: float) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    images, labels = digits.split(digits.SOURCE_DIGITS, "pool")
    x_all = nhwc_to_nchw(images).float() / 127.5 - 1.0
    y_all = torch.from_numpy(labels)
    model = DiTTransformer2DModel(**SOURCE_DIT).train()
    dit_initialise(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # labels are dropped below, seeded
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = NoiseSchedule(DDPMScheduler(**SCHEDULE).betas.numpy())
    generator = torch.Generator().manual_seed(seed)
    null, warmup, start, running = len(digits.SOURCE_DIGITS), 100, time.time(), 0.0
    for step in range(steps):
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        x0 = shifted(x_all[index], generator)
        y = torch.where(torch.rand(batch_size, generator=generator) < 0.1, null, y_all[index])
        t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, noise, t)
        loss = diffusion_loss(model(x_t, timestep=t, class_labels=y).sample, x0, x_t, noise, t, schedule).mean()
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            print(f"source model step {step + 1}/{steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
    return ema


def train_classifier(seed: int, steps: int, batch_size: int = 128) -> FeatureNet:
    torch.manual_seed(seed)
    every = digits.SOURCE_DIGITS + digits.TARGET_DIGITS
    images, labels = digits.split(every, "pool")
    x_all, y_all = nhwc_to_nchw(images), torch.from_numpy(labels)
    net = FeatureNet(num_classes=len(every), num_attributes=1)  # the attribute head is unused here
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        batch = shifted(x_all[index].float(), generator).round().to(torch.uint8)
        logits, _ = net.heads(batch)
        loss = torch.nn.functional.cross_entropy(logits, y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return net.eval().requires_grad_(False)


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
    model = train_source_model(args.seed, args.steps, args.batch_size, args.lr)
    info["source_model"] = {
        "config": SOURCE_DIT, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seconds": round(time.time() - start, 1), "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    model.save_pretrained(tmp / "source_model" / "transformer")
    DDPMScheduler(**SCHEDULE).save_pretrained(tmp / "source_model" / "scheduler")
    family = DiTFamily(model, None, dict(DDPMScheduler(**SCHEDULE).config))
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
