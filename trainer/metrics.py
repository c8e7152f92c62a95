"""Rank-0 reporting: TensorBoard scalars and images, `metrics.jsonl`, a progress bar with ETA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
    """Does nothing on ranks other than 0, so the loop can call it everywhere."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, progress: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # append: a resumed run continues the file
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}")

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def images(self, step: int, images: torch.Tensor, name: str = "samples") -> Path | None:
        """Saves a grid of images in [-1, 1] as PNG under the run directory and to TensorBoard."""
        if not self.enabled:
            return None
        grid = image_grid(images)
        path = self.run_dir / "samples" / f"{name}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        self.writer.add_image(name, grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 HWC grid image (1 or 3 channels become RGB)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = x[i].permute(1, 2, 0).numpy()
    return grid
