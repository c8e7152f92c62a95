"""The small models the experiments ship: the pixel-space DiTs pre-trained as their source models (and their samples),
and the classifiers whose features and calls score the samples.

One recipe for every shipped source model (demo, digits, glyphs): DiT's objective (`trainer.loss.diffusion_loss`,
learned sigma) on the linear betas 1e-4..0.02 over 1000 steps, 10% seeded label dropout to the null class, AdamW
with a linear warm-up then cosine decay to 10%, grad-norm clip 1 and an EMA (decay 0.999) whose weights are what
ships. What differs between the data sets is the model config and `draw`, which gives each step's clean images.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image

from models.dit import DiTFamily
from models.feature_net import FeatureNet
from trainer.loss import NoiseSchedule, diffusion_loss

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

# draw(step, generator) -> (clean images in [-1, 1] NCHW, labels): one training batch.
Draw = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SourceRecipe:
    """What a pre-training run is: the DiT config and the optimisation settings (the checkpoint's identity)."""

    config: dict
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup: int = 200
    log_every: int = 250
    extra: dict = field(default_factory=dict)  # anything else that changes the run (augmentation, data file)

    @property
    def null_class(self) -> int:
        return self.config["num_embeds_ada_norm"]  # the extra last row of the label table


def dit_initialise(model: DiTTransformer2DModel) -> None:
    """DiT's own initialisation, which diffusers does not apply: xavier linears, small embeddings, and zeroed
    adaLN modulations and output layers (adaLN-Zero: every block starts as the identity). Trains much faster."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    patch = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    torch.nn.init.zeros_(patch.bias)
    for block in model.transformer_blocks:
        embedder = block.norm1.emb
        torch.nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def train_source_model(
    recipe: SourceRecipe,
    draw: Draw,
    on_log: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
) -> tuple[DiTTransformer2DModel, float]:
    """Trains `recipe` on the batches of `draw`; returns the EMA weights and the training seconds.
    `on_log(step, ema)` runs at every log line; `checkpoint` (if given) is written every `checkpoint_every` steps
    and resumed from when it holds the same recipe, so a killed run on a busy machine loses little."""
    torch.manual_seed(recipe.seed)
    model = DiTTransformer2DModel(**recipe.config).train()
    dit_initialise(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # diffusers drops labels with torch.rand; we drop them below, seeded
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = NoiseSchedule(DDPMScheduler(**SCHEDULE).betas.numpy())
    generator = torch.Generator().manual_seed(recipe.seed)
    run_key = json.dumps(asdict(recipe), sort_keys=True)
    first_step, seconds, running = 0, 0.0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["run_key"] == run_key:  # a checkpoint of another recipe is ignored (and later overwritten)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            first_step, seconds, running = state["step"], state["seconds"], state["running"]
            print(f"source model resumed at step {first_step} from {checkpoint}", flush=True)
    steps, start = recipe.steps, time.time() - seconds
    for step in range(first_step, steps):
        x0, labels = draw(step, generator)
        dropped = torch.rand(len(labels), generator=generator) < 0.1
        labels = torch.where(dropped, recipe.null_class, labels)
        t = torch.randint(0, schedule.num_timesteps, (len(labels),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, noise, t)
        output = model(x_t, timestep=t, class_labels=labels).sample
        loss = diffusion_loss(output, x0, x_t, noise, t, schedule).mean()
        # Linear warm-up, then cosine decay to 10%: a short run still ends on a low, stable learning rate.
        progress = max(0.0, (step - recipe.warmup) / max(1, steps - recipe.warmup))
        warm = min(1.0, (step + 1) / recipe.warmup)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))  # short warm-up so early EMA is not the random init
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % recipe.log_every == 0 or step + 1 == steps:
            print(f"source model step {step + 1}/{steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
            if on_log is not None:
                on_log(step + 1, ema)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state = dict(
                run_key=run_key,
                step=step + 1,
                seconds=time.time() - start,
                running=running,
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
            )
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # never a half-written checkpoint
    return ema, time.time() - start


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each NCHW image moved by up to one pixel (filled with the background): cheap augmentation for the small
    training sets of the classifiers."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), value=float(images.min()))
    dx, dy = torch.randint(0, 3, (2, len(images)), generator=generator)
    size = images.shape[-1]
    return torch.stack([p[:, y : y + size, x : x + size] for p, x, y in zip(padded, dx.tolist(), dy.tolist())])


def fit_classifier(
    net: FeatureNet, images: torch.Tensor, classes: torch.Tensor, steps: int, batch_size: int, seed: int,
    attributes: torch.Tensor | None = None, attribute_weight: float = 0.0,
) -> FeatureNet:  # fmt: skip
    """Trains `net`'s class head (and, given `attributes`, its attribute head as a second classifier with that
    weight: the glyphs' fonts) by cross-entropy on 1-pixel-shifted uint8 NCHW `images`; AdamW at 2e-3 with cosine
    decay to 0 and weight decay 1e-4. Returns it frozen, in eval mode."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = shifted(images[index].float(), generator).round().to(torch.uint8)
        class_logits, attribute_logits = net.heads(batch)
        loss = torch.nn.functional.cross_entropy(class_logits, classes[index])
        if attributes is not None:
            loss = loss + attribute_weight * torch.nn.functional.cross_entropy(attribute_logits, attributes[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 250 == 0:
            print(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return net.eval().requires_grad_(False)


def source_family(model: DiTTransformer2DModel) -> DiTFamily:
    return DiTFamily(model, None, dict(DDPMScheduler(**SCHEDULE).config))


def save_source_model(model: DiTTransformer2DModel, folder: Path) -> None:
    """`transformer/` and `scheduler/`: the folder layout `model.pretrained` reads."""
    model.save_pretrained(folder / "transformer")
    DDPMScheduler(**SCHEDULE).save_pretrained(folder / "scheduler")


def sample_images(
    family: DiTFamily, labels: torch.Tensor, seed: int, num_steps: int = 50, guidance_scale: float = 1.0
) -> np.ndarray:
    """DDIM samples (class-conditional, classifier-free guidance `guidance_scale`) as uint8 [N, H, W, 3]."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for chunk in labels.split(250):
        x = family.sample(
            family.denoiser, chunk, num_steps=num_steps, guidance_scale=guidance_scale, generator=generator
        )
        chunks.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks)


def save_grid(images: np.ndarray, path: Path, columns: int, scale: int = 4) -> None:
    rows = len(images) // columns
    size = images.shape[1]
    grid = images[: rows * columns].reshape(rows, columns, size, size, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * size, columns * size, 3)
    Image.fromarray(grid).resize((columns * size * scale, rows * size * scale), Image.NEAREST).save(path)
