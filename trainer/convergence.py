"""Sudden-convergence tracking of a ControlNet (paper, Sec. 4.2 and Appendix C).

Every `eval.every` steps, generate images for a fixed validation set of controls with fixed seeds, re-annotate
them with the task's annotator and compare the result with the input controls: SSIM after a Gaussian blur for
edges and sketches, MSE for depth and normal maps, pixel accuracy for segmentation. The curve goes to
TensorBoard and metrics.jsonl; the first step that crosses the threshold goes there and to convergence.json.

Where it runs: on every rank. The raw ControlNet (the paper evaluates the trained model, not an EMA) is
gathered once into a plain copy on every rank (a collective under ZeRO-3, the only one besides the final
sum), then each rank generates its share of the validation set with no collective in the denoising loop.
So the evaluation costs 1/W of the single-rank time, and its value does not depend on W: item i's noise
comes from (eval.seed, i).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from data.files import atomic_write_bytes
from data.formats import open_shard_set
from data.shard_jobs import derived_seed
from models.annotators import annotate_batch, annotator_for, as_control, to_uint8
from trainer import distributed
from trainer.config import CONVERGENCE_THRESHOLDS, Config, ConfigError
from trainer.metrics import MetricsLogger

METRICS = {"canny": "ssim", "sketch": "ssim", "depth": "mse", "normal": "mse", "seg": "pixel_accuracy"}
LOWER_IS_BETTER = {"mse"}
RESULT_NAME = "convergence.json"


def control_agreement(metric: str, annotated: np.ndarray, controls: np.ndarray, blur_sigma: float = 2.0):
    """Per-sample agreement of re-annotated outputs with the input controls, both uint8 (N, H, W, 3)."""
    a, c = (torch.from_numpy(v.astype(np.float32) / 255.0).permute(0, 3, 1, 2) for v in (annotated, controls))
    if metric == "ssim":  # thin edges barely overlap pixel for pixel: blur both first, then compare structure
        # Imported here: torchmetrics costs ~3 s at import (it pulls in transformers), which every training rank
        # would pay at start-up, and only a ControlNet run that tracks convergence by SSIM needs it.
        from torchmetrics.functional.image import structural_similarity_index_measure

        a, c = (blur(v.mean(dim=1, keepdim=True), blur_sigma) for v in (a, c))
        return structural_similarity_index_measure(a, c, data_range=1.0, reduction="none").double()
    if metric == "mse":
        return ((a - c) ** 2).flatten(1).mean(dim=1).double()
    if metric == "pixel_accuracy":  # a pixel is right when its colour-coded class is the same
        return torch.from_numpy((annotated == controls).all(axis=-1).reshape(len(a), -1).mean(axis=1))
    raise ValueError(f"unknown metric {metric!r}")


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, 1, H, W) images, edges reflected."""
    if sigma <= 0:
        return images
    blurred = [cv2.GaussianBlur(image[0].numpy(), (0, 0), sigma) for image in images]
    return torch.from_numpy(np.stack(blurred))[:, None]


def crosses(metric: str, value: float, threshold: float) -> bool:
    return value <= threshold if metric in LOWER_IS_BETTER else value >= threshold


class ConvergenceTracker:
    def __init__(self, cfg: Config, family, run_dir: Path, rank: int, world_size: int, device, start_step: int = 0):
        """Checks and loads this rank's share of the validation set; keeps the history of steps before
        `start_step` (a resume re-evaluates the later ones)."""
        self.cfg, self.e, self.family = cfg, cfg.eval, family
        self.rank, self.world_size, self.device = rank, world_size, device
        sd = cfg.model.sd_controlnet
        self.metric = METRICS[sd.control]
        self.threshold = CONVERGENCE_THRESHOLDS[sd.control] if self.e.threshold is None else self.e.threshold
        self.annotate = annotator_for(sd.control, sd.annotator, tuple(sd.canny_thresholds))
        if self.annotate is None:
            raise ConfigError(
                f"eval.every={self.e.every}: tracking convergence re-annotates generated images, and "
                f"model.sd_controlnet.control={cfg.model.sd_controlnet.control} has no built-in annotator: "
                "set model.sd_controlnet.annotator=path/to/module.py[:function]"
            )
        key, folder = ("eval.data", self.e.data) if self.e.data else ("data.target", cfg.data.target)
        dataset = open_shard_set(folder, verify=cfg.data.verify)
        if not {"tokens", "control"} <= set(dataset.manifest.fields):
            raise ConfigError(
                f"{key}={folder} has no tokens and control fields: prepare it with model.family=sd_controlnet"
            )
        self.indices = list(range(min(self.e.num_controls, len(dataset))))[rank::world_size]
        samples = [dataset[i] for i in self.indices]  # a rank may have none when N < W
        self.tokens = torch.from_numpy(np.asarray([s["tokens"] for s in samples], dtype=np.int64))
        self.controls = np.asarray(
            [
                as_control(s["control"], s["control"].shape[:2], f"{key} sample {i}")
                for s, i in zip(samples, self.indices)
            ],
            dtype=np.uint8,
        )
        self.path = Path(run_dir) / RESULT_NAME
        self.history = []
        if rank == 0 and self.path.is_file():
            self.history = [h for h in json.loads(self.path.read_text())["history"] if h["step"] < start_step]

    def noise(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.e.seed, index))
        return torch.randn(self.family.sample_shape, generator=generator)

    @torch.no_grad()
    def after_step(self, step: int, engine, log: MetricsLogger) -> float:
        """Evaluates at every eval.every-th step (on every rank); returns the seconds it took."""
        if step % self.e.every:
            return 0.0
        started = time.perf_counter()
        with distributed.full_parameters(engine.module):
            weights = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        model = self.family.denoiser_from_state_dict(weights).to(self.device)
        sums, grid = torch.zeros(2, dtype=torch.float64), None
        for first in range(0, len(self.indices), self.e.batch_size):
            batch = slice(first, first + self.e.batch_size)
            images = self.family.sample(
                model, self.tokens[batch], torch.from_numpy(self.controls[batch]),
                num_steps=self.e.num_steps, guidance_scale=self.e.guidance_scale,
                noise=torch.stack([self.noise(i) for i in self.indices[batch]]),
            )  # fmt: skip
            annotated = annotate_batch(self.annotate, to_uint8(images))
            values = control_agreement(self.metric, annotated, self.controls[batch], self.e.blur_sigma)
            sums += torch.tensor([values.sum().item(), len(values)], dtype=torch.float64)
            if grid is None:
                grid = side_by_side(self.controls[batch], images, annotated)
        del model
        if self.world_size > 1:
            sums = distributed.all_reduce_sum(sums.to(self.device)).cpu()
        value = float(sums[0] / sums[1])
        if self.rank == 0:
            self.record(step, value, log, grid)
        return time.perf_counter() - started

    def record(self, step: int, value: float, log: MetricsLogger, grid: torch.Tensor | None) -> None:
        self.history.append({"step": step, "value": value})
        crossing = next((h["step"] for h in self.history if crosses(self.metric, h["value"], self.threshold)), None)
        log.scalars(step, {f"convergence/{self.metric}": value, "convergence/first_step": crossing})
        if grid is not None:
            log.images(step, grid, name="convergence")
        result = {
            "control": self.cfg.model.sd_controlnet.control, "metric": self.metric, "threshold": self.threshold,
            "lower_is_better": self.metric in LOWER_IS_BETTER, "first_step": crossing, "history": self.history,
        }  # fmt: skip
        atomic_write_bytes(self.path, (json.dumps(result, indent=1) + "\n").encode())


def side_by_side(controls: np.ndarray, images: torch.Tensor, annotated: np.ndarray) -> torch.Tensor:
    """(control | generated image | its re-annotation) per validation item, in [-1, 1], for the logged grid."""
    to_pixels = lambda maps: torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    return torch.cat([to_pixels(controls), images.float().cpu(), to_pixels(annotated)], dim=-1)


def convergence_tracker(cfg: Config, family, run_dir: Path, rank: int, world_size: int, device, start_step: int):
    """The tracker when cfg.eval.every > 0, else None."""
    if not cfg.eval.every:
        return None
    return ConvergenceTracker(cfg, family, run_dir, rank, world_size, device, start_step)
