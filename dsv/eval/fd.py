"""Fréchet distance between two sets of features, each summarised by a Gaussian, in float64.

    mu_a, cov_a = gaussian_stats(features_a)          # features (N, F) -> (F,), (F, F)
    fd = frechet_distance(mu_a, cov_a, mu_b, cov_b)

FD = |mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)). The last trace is taken
symmetrically: with R = cov_a^(1/2) (eigendecomposition, negative round-off eigenvalues set to 0),
cov_a cov_b is similar to R cov_b R, which is symmetric positive semi-definite, so
tr((cov_a cov_b)^(1/2)) = sum of the square roots of R cov_b R's eigenvalues. No scipy, no
complex round-off, and rank-deficient covariances (fewer clips than features) are fine.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64; needs N >= 2."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, F), got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (F, F)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b), computed in float64."""
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (*mu_a.shape, *mu_a.shape):
        raise ValueError(f"mismatched statistics: means {tuple(mu_a.shape)}, {tuple(mu_b.shape)}; "
                         f"covariances {tuple(cov_a.shape)}, {tuple(cov_b.shape)}")
    mu_a, cov_a, mu_b, cov_b = (x.double() for x in (mu_a, cov_a, mu_b, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()  # tr((cov_a cov_b)^(1/2))
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(fd.item(), 0.0)


def features_fd(features_a: Tensor, features_b: Tensor) -> float:
    """FD between the Gaussians fitted to two feature sets (N_a, F) and (N_b, F)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))
