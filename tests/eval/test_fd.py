"""Fréchet distance against closed forms and scipy's matrix square root, in float64."""
import numpy as np
import pytest
import scipy.linalg
import torch

from dsv.eval.fd import features_fd, frechet_distance, gaussian_stats


def _random_rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_diagonal_gaussians_match_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    var_a, var_b = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64) * 3
    expected = (mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    got = frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert got == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)  # float64 eigh: ~1e-15 relative


def test_two_known_gaussians():
    # N(0, I) vs N(1, 4 I) in 3 dimensions: 3 * 1^2 + 3 * (1 - 2)^2 = 6
    got = frechet_distance(torch.zeros(3), torch.eye(3), torch.ones(3), 4 * torch.eye(3))
    assert got == pytest.approx(6.0, rel=1e-12)


def test_non_commuting_covariances_match_scipy_sqrtm():
    gen = torch.Generator().manual_seed(1)
    n = 8
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    cov_a, cov_b = a @ a.T, b @ b.T + 0.5 * torch.eye(n, dtype=torch.float64)  # full rank and not commuting
    mu_a, mu_b = torch.randn(n, generator=gen, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    root = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
    expected = ((mu_a - mu_b) ** 2).sum().item() + np.trace(cov_a.numpy() + cov_b.numpy() - 2 * root).real
    assert frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)  # sqrtm: ~1e-12


def test_invariant_under_a_common_rotation():
    gen = torch.Generator().manual_seed(2)
    mu_a, mu_b = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    var_a, var_b = torch.rand(5, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64)
    q = _random_rotation(5, gen)
    rotated = frechet_distance(q @ mu_a, q @ torch.diag(var_a) @ q.T, q @ mu_b, q @ torch.diag(var_b) @ q.T)
    assert rotated == pytest.approx(frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b)), rel=1e-10)


@pytest.mark.parametrize("n", [20, 200])  # fewer clips than features (rank-deficient covariance), and more
def test_fd_of_a_set_with_itself_is_zero(n):
    features = torch.randn(n, 64, generator=torch.Generator().manual_seed(3))
    assert features_fd(features, features) == pytest.approx(0.0, abs=1e-8)  # eigenvalue round-off, sqrt'ed


def test_gaussian_stats_match_numpy():
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))
    mu, cov = gaussian_stats(features)
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), features.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-14)


def test_samples_of_two_gaussians_approach_the_closed_form():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(20000, 2, generator=gen, dtype=torch.float64)  # N(0, I)
    b = torch.randn(20000, 2, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 0.5]) + 1  # N(1, diag(4, .25))
    expected = 2 * 1.0 + (1 - 2) ** 2 + (1 - 0.5) ** 2  # 3.25
    assert features_fd(a, b) == pytest.approx(expected, abs=0.1)  # sampling error ~ 1/sqrt(20000) per moment


def test_mismatched_or_too_few_features_are_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(torch.randn(1, 3))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
