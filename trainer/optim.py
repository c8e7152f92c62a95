"""AdamW that skips a step on every rank when any rank saw a non-finite loss or gradient, and the LR schedule.

DeepSpeed calls the optimizer's `step` on every rank at the accumulation boundary (inside ZeRO, on the
rank's fp32 partition), so the all-rank decision is taken there: parameters, optimizer state, EMA and
the schedule stay as they were when the step is skipped.
"""

from __future__ import annotations

import torch

from trainer import distributed


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, *, lr: float, warmup_steps: int = 0, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.base_lr, self.warmup_steps = lr, warmup_steps
        self.loss_nonfinite = False  # set by the loop from this rank's micro-batch losses
        self.skip: bool | None = None  # the all-rank decision of the current step; None until taken

    def begin_step(self, applied_steps: int) -> None:
        """Before the boundary: reset the decision and set the LR of the `applied_steps`-th update."""
        self.loss_nonfinite, self.skip = False, None
        warmup = min(1.0, (applied_steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        for group in self.param_groups:
            group["lr"] = group.get("base_lr", self.base_lr) * warmup  # a group's own LR (DiffFit: x10)

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip is None:  # ZeRO-3 may call once per parameter sub-group: decide once, on every rank
            grads_finite = all(
                torch.isfinite(p.grad).all()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            )
            self.skip = distributed.any_rank(self.loss_nonfinite or not grads_finite, self._device())
        if self.skip:
            return None
        return super().step(closure)

    def skipped(self) -> bool:
        """After the boundary: True if this step changed nothing (also when DeepSpeed skipped it itself)."""
        return self.skip is not False

    def _device(self) -> torch.device:
        return next(p.device for group in self.param_groups for p in group["params"])
