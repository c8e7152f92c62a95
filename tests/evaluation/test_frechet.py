"""The Fréchet distance (FID, sFID): equal to the textbook formula with scipy's sqrtm where the covariances are
well-conditioned, finite where they are rank-deficient, and independent of LAPACK's general eigensolver (the one
that fails to converge with MKL on AVX-512)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from models.frechet import frechet_distance, trace_sqrt_product
from trainer.config import EvalConfig
from trainer.evaluation.features import all_metrics


def reference_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), scipy's general matrix square root (pytorch-fid's formula)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def correlated(num: int, dims: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=torch.Generator().manual_seed(100 + seed)) / math.sqrt(dims)
    return torch.randn(num, dims, generator=generator, dtype=torch.float64) @ mixing.double() + shift


@pytest.mark.parametrize("num, dims, shift", [(400, 8, 0.0), (2000, 32, 0.5), (600, 64, 2.0)])
def test_well_conditioned_cases_equal_scipys_sqrtm(num, dims, shift):
    real, fake = correlated(num, dims, 0), correlated(num + 37, dims, 1, shift)
    expected = reference_fid(real.numpy(), fake.numpy())
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(real.float(), fake.float()) == pytest.approx(expected, rel=1e-5)  # float32 features
    assert abs(frechet_distance(real, real)) < 1e-9 * expected


def test_trace_term_is_symmetric_in_its_arguments():
    a, b = (torch.cov(correlated(300, 16, seed).T) for seed in (2, 3))
    torch.testing.assert_close(trace_sqrt_product(a, b), trace_sqrt_product(b, a), rtol=1e-10, atol=0)


def test_48_samples_of_256_dim_features_give_finite_fid_and_sfid(monkeypatch):
    """Fewer samples than dimensions: rank-deficient covariances, as sFID of a small evaluation. The general
    eigensolver is made to fail as it does on MKL: nothing may depend on it."""

    def fails_to_converge(*args, **kwargs):
        raise torch._C._LinAlgError("linalg.eigvals: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvals", fails_to_converge)
    generator = torch.Generator().manual_seed(0)
    real = {"pooled": torch.randn(48, 256, generator=generator), "spatial": torch.randn(48, 256, generator=generator)}
    # the fake set lies in a 5-dimensional subspace: its covariance has rank 5 of 256
    low_rank = torch.randn(48, 5, generator=generator) @ torch.randn(5, 256, generator=generator)
    fake = {"pooled": torch.randn(48, 256, generator=generator) + 1, "spatial": low_rank}
    metrics = all_metrics(real, fake, EvalConfig(kid_subsets=2, kid_subset_size=32))
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["sfid"])
    assert metrics["fid"] > 0 and metrics["sfid"] > 0
    assert abs(frechet_distance(real["spatial"], real["spatial"])) < 1e-6 * metrics["sfid"]


def test_bad_feature_sets_are_named():
    with pytest.raises(ValueError, match=r"feature sets differ in shape: \(4, 8\) vs \(4, 9\)"):
        frechet_distance(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match=r"needs \[N >= 2, D\] features per set, got shape \(1, 8\)"):
        frechet_distance(torch.zeros(1, 8), torch.zeros(4, 8))
