"""Rank-0 reporting: TensorBoard scalars and images, `metrics.jsonl`, a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data.files import atomic_write_bytes
from trainer import distributed

NUM_T_BUCKETS = 10
LOG_INTERVAL_S = 30.0  # a progress line this often where stderr is a log file (SLURM's .out, CI), not a terminal


class _Lines:
    """Where tqdm would redraw a bar in place with a carriage return, writes each redraw as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**options) -> tqdm:
    """A tqdm bar: redrawn in place on a terminal; in a log, one plain line every LOG_INTERVAL_S seconds (and at
    the end), so that a job's log is not thousands of redraws."""
    if not sys.stderr.isatty():
        options.pop("dynamic_ncols", None)
        options = {"file": _Lines(sys.stderr), "mininterval": LOG_INTERVAL_S, "ncols": 100, **options}
    return tqdm(**options)


class MetricsLogger:
    """Does nothing on ranks other than 0, so the loop can call it everywhere."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, progress: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        path = self.run_dir / "metrics.jsonl"
        drop_lines_after(path, start_step)  # a resume redoes the steps after its checkpoint: log each step once
        self.jsonl = open(path, "a")  # append: a resumed run continues the file
        self.bar = progress_bar(
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
        self.bar.set_postfix(
            loss=f"{values.get('loss/total', float('nan')):.4f}", refresh=False
        )  # shown at the next redraw

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


def drop_lines_after(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without the lines of steps after `step`, and without a line a crash cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # the half-written last line of a killed run
    atomic_write_bytes(path, "".join(kept).encode())


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


class StepStats:
    """Sums of one logging interval (losses by source and t-bucket, gradient norm), kept on the device and
    reduced over ranks only when reported; timings on the host. The retention slots' mean loss is logged as
    `loss/<retention_name>` (loss/bank, loss/kd)."""

    def __init__(
        self, device: torch.device, level_bucket: Callable[[torch.Tensor, int], torch.Tensor], retention_name: str
    ):
        self.device, self.level_bucket = device, level_bucket  # the noise process's bands of its levels
        self.retention_name = retention_name
        self._reset()

    def _reset(self) -> None:
        # total, target sum, target count, retention sum, retention count, then per t-bucket sums and counts
        self.sums = torch.zeros(5 + 2 * NUM_T_BUCKETS, dtype=torch.float64, device=self.device)
        self.grad_norm: torch.Tensor | None = None
        self.data_seconds = 0.0
        self.images = self.steps = 0
        self.started = time.perf_counter()

    def timed_data(self, fn, *args):
        begin = time.perf_counter()
        out = fn(*args)
        self.data_seconds += time.perf_counter() - begin
        return out

    def add(self, losses: torch.Tensor, weights: torch.Tensor, is_retention: torch.Tensor, t: torch.Tensor) -> None:
        """Device arithmetic only (no masks, no reads); a non-finite loss stays in its own source's sum."""
        losses, bank = losses.double(), is_retention.to(self.device)
        zero = torch.zeros_like(losses)
        target_losses, bank_losses = torch.where(bank, zero, losses), torch.where(bank, losses, zero)
        by_source = torch.stack(
            [(losses * weights).sum(), target_losses.sum(), (~bank).sum(), bank_losses.sum(), bank.sum()]
        )
        self.sums[:5] += by_source
        bucket = self.level_bucket(t, NUM_T_BUCKETS).to(self.device)
        self.sums[5 : 5 + NUM_T_BUCKETS].index_add_(0, bucket, losses)
        self.sums[5 + NUM_T_BUCKETS :].index_add_(0, bucket, torch.ones_like(losses))

    def finish_step(self, global_batch_size: int, grad_norm: torch.Tensor | None) -> None:
        self.grad_norm = grad_norm
        self.images += global_batch_size
        self.steps += 1

    def report(self, engine, skipped_total: int = 0) -> dict[str, float]:
        """All-reduces the interval's sums (a collective) and returns the scalars to log: the host reads of
        a log step."""
        sums = distributed.all_reduce_sum(self.sums.clone()).tolist()
        elapsed = time.perf_counter() - self.started
        lr = engine.get_lr()[0]
        values = {
            "loss/total": sums[0] / self.steps,
            "loss/target": sums[1] / sums[2] if sums[2] else None,
            f"loss/{self.retention_name}": sums[3] / sums[4] if sums[4] else None,
            "grad_norm": None if self.grad_norm is None else float(self.grad_norm),  # of the last step
            "skipped_steps": skipped_total,  # non-finite loss or gradient on some rank: nothing was updated
            "lr": float(lr),
            "images_per_second": self.images / elapsed,
            "time/data_wait_fraction": self.data_seconds / elapsed,  # reading is ahead: only the wait counts
        }
        for b in range(NUM_T_BUCKETS):
            count = sums[5 + NUM_T_BUCKETS + b]
            values[f"loss_t/{b:02d}"] = sums[5 + b] / count if count else None
        self._reset()
        return values
