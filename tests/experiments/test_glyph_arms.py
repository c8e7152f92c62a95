"""The glyph experiment's arms (trainer/experiments/glyph_arms.py) are valid configs of the glyphs preset and split
the timesteps as their names say."""

import numpy as np
import pytest
from diffusers import DDPMScheduler

from models.noise.ddpm import DDPMProcess
from trainer.config import load_config
from trainer.experiments.glyph_arms import ARMS, TRUNCATION_LEVELS, arm_overrides, logsnr_bank_share
from trainer.experiments.shipped_models import SCHEDULE

BETAS = DDPMScheduler(**SCHEDULE).betas.double().numpy()  # the source models' schedule
T = np.arange(1000, dtype=np.float64)


def split_of(name: str, bank_max_t: int | None = None):
    cfg = load_config("glyphs", arm_overrides(name, BETAS, bank_max_t))
    return cfg, DDPMProcess(BETAS).split(cfg.method).probabilities()


def test_every_arm_is_a_valid_config_with_its_stated_split():
    for name in ARMS:
        cfg, (target, bank) = split_of(name, TRUNCATION_LEVELS[1])
        assert np.isclose(target.sum(), 1.0), name
        if cfg.method.bank_ratio > 0:
            assert np.isclose(bank.sum(), 1.0), name
    _, (target, _) = split_of("finetune")
    np.testing.assert_allclose(target, np.full(1000, 1e-3))  # uniform t
    _, (target, _) = split_of("reconsolidation_only")
    np.testing.assert_allclose(target, T / T.sum())  # psi = t/T, no bank
    cfg, (target, bank) = split_of("retention_only")
    np.testing.assert_allclose(target, np.full(1000, 1e-3))  # uniform target t ...
    np.testing.assert_allclose(bank, (1000 - T) / (1000 - T).sum())  # ... and xi proportional to 1 - t/T (+1/T)
    assert cfg.method.bank_ratio == 0.5
    _, (_, bank) = split_of("bank_truncated", 300)
    assert bank[301:].sum() == 0 and bank[:301].sum() == pytest.approx(1.0)


def test_logsnr_arm_takes_the_bank_share_of_its_xi():
    """E[xi] of psi = sigmoid((-2.5 - logSNR(t)) / 1) over uniform t, by hand from the betas."""
    log_snr = np.log(np.cumprod(1 - BETAS) / (1 - np.cumprod(1 - BETAS)))
    expected = np.mean(1 - 1 / (1 + np.exp((log_snr + 2.5) / 1.0)))
    assert logsnr_bank_share(BETAS) == pytest.approx(expected, abs=1e-4)
    cfg, _ = split_of("logsnr")
    assert cfg.method.bank_ratio == logsnr_bank_share(BETAS) and 0.3 < cfg.method.bank_ratio < 0.7
    with pytest.raises(ValueError, match="bank_truncated needs its bank_max_t, chosen on target_val"):
        arm_overrides("bank_truncated", BETAS)
