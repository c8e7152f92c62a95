"""Knowledge distillation from the frozen pre-trained model (the rebuttal's bank-free retention).

The retention slots re-use target images: the target data is all a KD run has, and the pre-trained model's
prediction on them at low noise is what the bank's samples would otherwise teach. They keep the plan's bank rules:
`t ~ xi` (the low-noise end, where the chain of forgetting says the pre-trained model denoises best) and the null
condition (the target labels mean nothing to the teacher's label space; as with the bank, only the unconditional
branch is retained). They walk their own seeded permutation of the target set, independent of the target slots'
(an image may meet itself at another t in both). Their loss is the distance of the student's prediction to the
teacher's on the same noisy input; they weigh `method.kd_weight / (global number of KD slots)` (rebuttal: 0.05).

The teacher is a second copy of the denoiser, built from model.pretrained outside DeepSpeed, frozen, in the
training precision, on every rank: it costs its weights once more per rank (no gradients, no optimizer state, no
activations kept: it runs under no_grad) and one forward of the KD slots per step. ZeRO-3 runs are refused: they
promise that no rank holds a whole model (DESIGN.md, invariant 7).
"""

from __future__ import annotations

import numpy as np
import torch

from models.family import to_device
from trainer.errors import ConfigError
from trainer.retention import RETENTION


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Per-sample KD loss: mean squared distance of the student's epsilon to the teacher's, plus, for a family
    that learns its variance (2C output channels), that of the variance channels.

    The variance channels are matched too: the KD slots are where low-noise timesteps are trained, and with a bank
    the variational bound trains the variance there; without a target for them the variance of the low-noise
    steps would follow the target slots alone. Each part is a mean over its own channels, so the epsilon part
    has the scale of the objective's epsilon-MSE."""
    eps = (student[:, :num_channels] - teacher[:, :num_channels]).pow(2).flatten(1).mean(dim=1)
    if student.shape[1] == num_channels:
        return eps
    return eps + (student[:, num_channels:] - teacher[:, num_channels:]).pow(2).flatten(1).mean(dim=1)


class Distillation:
    name = "kd"
    source_key = "data.target"

    def __init__(self, cfg):
        self.cfg = cfg
        self.loss_weight = cfg.method.kd_weight
        self.teacher = None  # the frozen pre-trained family, built by `prepare`
        self.dtype = torch.float32

    @staticmethod
    def check(cfg) -> None:
        m, fix = cfg.method, "or method.retention=bank for bank replay"
        if cfg.data.bank:
            raise ConfigError(
                f"method.retention=kd distils from the frozen model and reads no memory bank, but data.bank="
                f"{cfg.data.bank} is set: remove it (data.bank=null), {fix}"
            )
        if m.bank_ratio == 0:
            raise ConfigError(
                "method.retention=kd with method.bank_ratio=0 has no KD slots (bank_ratio is the retention share of "
                "every global batch, whatever the retention): set method.bank_ratio, e.g. 0.5, or method.retention="
                "bank with method.bank_ratio=0 for plain fine-tuning"
            )
        if m.timestep_weights == "complement" and m.tau == 0:
            raise ConfigError(
                "method.retention=kd with method.tau=0 is plain fine-tuning (psi = 1, so xi = 1 - psi = 0): the KD "
                "slots would have no timestep to draw; set method.tau > 0 (paper: 1)"
            )
        if m.bank_loss_weight != 1.0:
            raise ConfigError(
                f"method.bank_loss_weight={m.bank_loss_weight} weights bank replay, which method.retention=kd does "
                f"not run: weight the KD slots with method.kd_weight (now {m.kd_weight}; rebuttal: 0.05) and leave "
                f"method.bank_loss_weight at 1, {fix}"
            )
        if m.kd_weight <= 0:
            raise ConfigError(f"method.kd_weight={m.kd_weight} must be > 0 (rebuttal: 0.05)")
        if cfg.train.zero_stage == 3:
            raise ConfigError(
                "method.retention=kd with train.zero_stage=3: the frozen teacher is a whole copy of the model on "
                "every rank, which a ZeRO-3 run promises never to hold; use train.zero_stage=2 (the teacher adds "
                "its weights once per rank, 2 bytes per parameter in bf16) or method.retention=bank"
            )

    def open_source(self, target, verify: str):
        return target  # the KD slots re-use target images (their own permutation of them)

    def prepare(self, device: torch.device, dtype: torch.dtype, load_pretrained) -> None:
        teacher = load_pretrained()  # as released: its own label space and null condition
        teacher.place_frozen(device, dtype)
        teacher.denoiser.to(device, dtype).eval().requires_grad_(False)
        self.teacher, self.dtype = teacher, dtype

    def slot_losses(self, objective, output, model_input, model_level, batch) -> torch.Tensor:
        """The teacher predicts on the student's own network input (the noise process's, e.g. EDM's c_in x_t)."""
        rows = np.flatnonzero(batch.ids[:, 1] == RETENTION)  # host-side ids: no device read
        if not len(rows):
            return objective
        index = to_device(torch.from_numpy(rows), objective.device)

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.index_select(0, index.to(tensor.device))

        null = torch.ones(len(rows), dtype=torch.bool)  # on the host, like the plan's mask
        with torch.no_grad():
            condition = self.teacher.condition({k: pick(v) for k, v in batch.condition.items()}, null)
            inputs = pick(model_input).to(self.dtype)
            predicted = self.teacher.predict(self.teacher.denoiser, inputs, pick(model_level), condition)
        kd = distillation_loss(pick(output).float(), predicted.float(), batch.x0.shape[1])
        return objective.index_copy(0, index, kd)
