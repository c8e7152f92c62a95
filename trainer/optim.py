"""Fused AdamW that skips a step on every rank, on the device, when any rank saw a non-finite loss or
gradient; and the warm-up LR schedule, which advances with applied steps only.

DeepSpeed calls the optimizer's `step` on every rank at the accumulation boundary (inside ZeRO, on the
rank's fp32 partition), so the all-rank decision is taken there, as a device tensor: one all-reduce of
two numbers (the non-finite flag and the squared gradient norm) and no host read. The fused kernel takes
the decision as its `found_inf` argument (as under a GradScaler): when it is 1, parameters, moments and the
step counter stay as they were. EMA and counters follow the same tensor (DESIGN invariant 6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer import distributed


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, *, lr: float, warmup_steps: int = 0, **kwargs):
        super().__init__(params, lr=lr, fused=True, **kwargs)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])  # a group may bring its own (PEFT: DiffFit's lr x 10)
        self.warmup_steps = warmup_steps
        self._device: torch.device | None = None
        self.loss_nonfinite: torch.Tensor | None = None  # or-ed by the loop from each micro-batch's losses
        self.found_inf: torch.Tensor | None = None  # the all-rank decision of the current step (1.0: skip)
        self.grad_norm: torch.Tensor | None = None  # the global gradient norm of the last step (device)
        self.norm_source: Callable[[], object] | None = None
        self.counters: SkipCounters | None = None

    def attach(self, device: torch.device, max_consecutive_skips: int, norm_source=None) -> None:
        """Called once the engine exists. `norm_source` returns ZeRO's global gradient norm of the step
        being taken (already reduced over ranks and over every parameter group, a device tensor); without
        ZeRO the gradients are whole on every rank and the norm is computed here."""
        self._device, self.norm_source = device, norm_source
        self.counters = SkipCounters(device, max_consecutive_skips)

    def begin_step(self) -> None:
        """Before the boundary: reset the decision and set each group's LR from the applied-step count."""
        self.loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self._device)
        self.found_inf, self.grad_norm = None, None
        scale = self.counters.warmup_scale(self.warmup_steps)
        for group in self.param_groups:
            group["lr"] = scale * group["base_lr"]

    def note_losses(self, losses: torch.Tensor) -> None:
        self.loss_nonfinite = self.loss_nonfinite | ~torch.isfinite(losses).all()

    @torch.no_grad()
    def step(self, closure=None):
        if self.found_inf is None:  # ZeRO-3 may call once per parameter sub-group: decide once, on every rank
            self.found_inf, self.grad_norm = self._decide()
        return super().step(closure)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm_source() if self.norm_source is not None else None
        if not torch.is_tensor(norm):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        norm = torch.zeros((), device=self._device) if norm is None else norm.float().to(self._device)
        # A NaN or Inf gradient anywhere makes the norm non-finite (ZeRO reports it as -1); the loss flag
        # needs the one all-reduce.
        loss_nonfinite = distributed.all_reduce_sum(self.loss_nonfinite.float().reshape(1))[0] > 0
        return (loss_nonfinite | ~torch.isfinite(norm) | (norm < 0)).float(), norm

    def finish_step(self, steps_done: int) -> torch.Tensor:
        """After the boundary: 1.0 if this step's update was applied on every rank, 0.0 if it was skipped.
        A step DeepSpeed skipped by itself (it never called `step`) counts as skipped."""
        skipped = self.found_inf if self.found_inf is not None else torch.ones((), device=self._device)
        self.found_inf = None
        return self.counters.advance(skipped, steps_done)


class SkipCounters:
    """Applied, skipped and consecutive-skip counts as device tensors, read only when logging or saving;
    `tripped_at` keeps the step at which the consecutive skips first reached the limit (0: never)."""

    def __init__(self, device: torch.device, max_consecutive_skips: int):
        self.max_consecutive_skips = max_consecutive_skips
        self.applied, self.skipped, self.consecutive, self.tripped_at = (
            torch.zeros((), device=device) for _ in range(4)
        )

    def warmup_scale(self, warmup_steps: int) -> torch.Tensor | float:
        return ((self.applied + 1) / warmup_steps).clamp(max=1.0) if warmup_steps else 1.0

    def advance(self, skipped: torch.Tensor, steps_done: int) -> torch.Tensor:
        self.applied += 1 - skipped
        self.skipped += skipped
        self.consecutive = (self.consecutive + 1) * skipped
        tripped = (self.consecutive >= self.max_consecutive_skips) & (self.tripped_at == 0)
        self.tripped_at = torch.where(tripped, steps_done, self.tripped_at)
        return 1 - skipped

    def restore(self, applied: int, skipped: int, consecutive: int) -> None:
        for tensor, value in ((self.applied, applied), (self.skipped, skipped), (self.consecutive, consecutive)):
            tensor.fill_(float(value))

    def read(self) -> tuple[int, int, int, int]:
        """(applied, skipped, consecutive, tripped_at): a host read, for log and save steps only."""
        values = torch.stack([self.applied, self.skipped, self.consecutive, self.tripped_at]).tolist()
        return tuple(int(v) for v in values)
