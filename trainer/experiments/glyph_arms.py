"""The arms of the glyph experiment (issue 18), fixed before any of its test numbers is seen.

Each arm is config overrides on top of configs/glyphs.yaml; every arm trains the same steps, seeds and batch on the
same data, so arms differ only in how the global batch is split between the target data and the bank and in the
timesteps each source draws. The paper's arms, its two ablations, and two options of ours (named so in the README):

- `finetune`: no bank, uniform t (the baseline);
- `difftune_paper`: r = 1/2, lambda = 1, psi = t/T, xi = 1 - psi;
- `difftune_released`: the released code's split (6 bank slots of 32 at lambda 0.1, its mirrored weights);
- `reconsolidation_only` (the paper's ablation): the psi-weighted target, no bank;
- `retention_only` (the paper's ablation): uniform target t plus the xi-weighted bank. With the mirrored weights
  psi = (t + 1)^0 = 1 and xi = (T - t)^1, proportional to 1 - t/T up to a 1/T shift;
- `logsnr` (ours): psi = sigmoid((c - logSNR(t)) / w) on the source schedule's log-SNR (c = -2.5: t ~ 500 on DiT's
  schedule, where the glyphs' class is decided), xi = 1 - psi, and the bank share E[xi], so that bank slots keep
  in step with xi (`logsnr_bank_share`);
- `bank_truncated` (ours): the paper's split with no bank draws above `bank_max_t` (the bank does not train the
  noisiest steps, where the source's style is chosen). Its level is the one free setting: chosen on target_val
  among `TRUNCATION_LEVELS`, then reported on target_heldout.

The negative control runs the same arms with the source's own Latin letters in the held-out decorative face (a
style shift of fine detail, decided at low noise, where retention should not help).
"""

from __future__ import annotations

import numpy as np

from models.noise.ddpm import DDPMProcess
from trainer.config import MethodConfig

ARMS: dict[str, list[str]] = {
    "finetune": ["method.bank_ratio=0", "method.tau=0"],
    "difftune_paper": ["method.bank_ratio=0.5", "method.bank_loss_weight=1", "method.tau=1",
                       "method.timestep_weights=complement"],
    "difftune_released": ["method.bank_ratio=0.2", "method.bank_count=floor", "method.bank_loss_weight=0.1",
                          "method.tau=1", "method.timestep_weights=mirrored", "method.bank_tau=1"],
    "reconsolidation_only": ["method.bank_ratio=0", "method.tau=1", "method.timestep_weights=complement"],
    "retention_only": ["method.bank_ratio=0.5", "method.bank_loss_weight=1", "method.tau=0",
                       "method.timestep_weights=mirrored", "method.bank_tau=1"],
    "logsnr": ["method.bank_loss_weight=1", "method.timestep_weights=logsnr", "method.logsnr_center=-2.5",
               "method.logsnr_width=1.0"],  # + method.bank_ratio=E[xi] (logsnr_bank_share)
    "bank_truncated": ["method.bank_ratio=0.5", "method.bank_loss_weight=1", "method.tau=1",
                       "method.timestep_weights=complement"],  # + method.bank_max_t (chosen on target_val)
}  # fmt: skip
TRUNCATION_LEVELS = (150, 300, 500)  # bank_truncated's candidates for method.bank_max_t
STEPS = (1000, 2000)
SEEDS = (0, 1, 2)
GUIDANCE = (1.0, 1.5)


def logsnr_bank_share(betas: np.ndarray, center: float = -2.5, width: float = 1.0) -> float:
    """E[xi] of the logsnr weights over uniform t on the schedule `betas`: the bank share of the `logsnr` arm."""
    method = MethodConfig(timestep_weights="logsnr", logsnr_center=center, logsnr_width=width)
    return round(DDPMProcess(betas).split(method).mean_weights()[1], 4)


def arm_overrides(name: str, betas: np.ndarray, bank_max_t: int | None = None) -> list[str]:
    """The overrides of arm `name`, completed with what it computes from the source schedule (`logsnr`) or what was
    chosen on the validation split (`bank_truncated`'s `bank_max_t`)."""
    overrides = list(ARMS[name])
    if name == "logsnr":
        overrides.append(f"method.bank_ratio={logsnr_bank_share(betas)}")
    if name == "bank_truncated":
        if bank_max_t is None:
            raise ValueError(f"bank_truncated needs its bank_max_t, chosen on target_val among {TRUNCATION_LEVELS}")
        overrides.append(f"method.bank_max_t={bank_max_t}")
    return overrides
