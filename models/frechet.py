"""The Fréchet distance between Gaussian fits of two feature sets: FID on pooled features, sFID on spatial ones.

d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). The trace term is computed in a symmetric form,
tr sqrt(S1 S2) = tr sqrt(A S2 A) with A = S1^(1/2), where both square roots come from symmetric
eigendecompositions (`eigh`) with negative round-off eigenvalues clamped to 0. S1 S2 itself is not symmetric:
torchmetrics' `eigvals(S1 @ S2)` (general LAPACK geev) fails to converge on some machines' LAPACK (MKL with
AVX-512) when the covariances are rank-deficient, while `eigh` of a symmetric matrix converges on any LAPACK.
Everything is computed in float64.
"""

from __future__ import annotations

import torch


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], unbiased covariance [D, D]) of [N, D] features, in float64."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"a Fréchet distance needs [N >= 2, D] features per set, got shape {tuple(features.shape)}")
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (round-off negatives -> 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S1 S2) = sum of the square roots of the eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2)."""
    root = _psd_sqrt(sigma1.double())
    middle = root @ sigma2.double() @ root
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance_of_gaussians(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    mu1, mu2 = mu1.double(), mu2.double()
    distance = (mu1 - mu2).square().sum() + sigma1.double().trace() + sigma2.double().trace()
    return float(distance - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance of two [N, D] feature sets (FID when the features are Inception's pooled ones).

    It is finite for any N >= 2. With fewer samples than feature dimensions (N <= D) the covariances are
    rank-deficient and the estimate is dominated by sampling noise: the number is finite but not meaningful as
    a comparison with published FIDs (those use 10k-50k samples); compare such values only with each other at
    the same N."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"feature sets differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
    return frechet_distance_of_gaussians(*gaussian_fit(real), *gaussian_fit(fake))
