"""Exponential moving average of the tuned weights, kept whole (fp32) on every rank, ZeRO-3 included."""

from __future__ import annotations

import torch

from trainer.distributed import full_parameters


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device | str = "cpu"):
        """Starts from the module's weights (as DiT does); call before DeepSpeed partitions them."""
        self.decay = decay
        self.weights = {k: v.detach().float().to(device, copy=True) for k, v in module.state_dict().items()}
        self.tuned = [name for name, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, applied: torch.Tensor | float = 1.0) -> None:
        """A collective under ZeRO-3 (the parameters are gathered): call on every rank. `applied` (0 or 1, a
        device tensor) leaves the EMA unchanged after a skipped step without reading it."""
        params = dict(module.named_parameters())
        with full_parameters(module):
            for name in self.tuned:
                self.weights[name].lerp_(params[name].detach().float(), (1.0 - self.decay) * applied)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.weights) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: keys {sorted(missing)[:5]} differ")
        self.weights = {k: state[k].to(self.weights[k].device, torch.float32, copy=True) for k in self.weights}
