"""The contrast subspace: leading generalised eigenvectors of (C_target, C_general + εI), orthonormalised."""

from __future__ import annotations

import pytest
import torch

from nspo_trl.nullspace.contrast import contrast_basis, dim_within_budget, energy_curve
from nspo_trl.nullspace.projector import SubspaceFactor


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def random_covariance(n: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64) * torch.logspace(
        0, -3, n, dtype=torch.float64
    )
    return x.T @ x


def test_the_basis_leads_with_the_directions_the_target_uses_and_the_general_inputs_do_not():
    """In a rotated diagonal pencil the order is known: by μ = C_t / (C_g + ε) per axis."""
    rotation = random_orthogonal(6, seed=0)
    c_general = rotation @ torch.diag(torch.tensor([10.0, 10, 10, 1, 1e-6, 1e-6], dtype=torch.float64)) @ rotation.T
    c_target = rotation @ torch.diag(torch.tensor([1.0, 1, 1, 1, 5, 1e-3], dtype=torch.float64)) @ rotation.T
    basis = contrast_basis(c_general, c_target, ridge=1e-7)  # ε = 1e-6: μ = 2.5e6, 500, ≈1, then 0.1 × 3
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    for column, axis in enumerate([4, 5, 3]):
        assert abs(float(basis[:, column] @ rotation[:, axis])) == pytest.approx(1.0, abs=1e-8), column


@pytest.mark.parametrize("k", [1, 3, 7])
def test_leading_spans_match_an_independent_cholesky_solution(k):
    """span(Q[:, :k]) equals the span of the top-k eigenvectors of L⁻¹ C_t L⁻ᵀ mapped back by L⁻ᵀ
    (L: Cholesky factor of C_g + εI), another route to the same pencil."""
    n, ridge = 12, 1e-7
    c_general, c_target = random_covariance(n, 40, seed=1), random_covariance(n, 30, seed=2)
    basis = contrast_basis(c_general, c_target, ridge=ridge)
    epsilon = ridge * float(torch.linalg.eigvalsh(c_general)[-1])
    chol = torch.linalg.cholesky(c_general + epsilon * torch.eye(n, dtype=torch.float64))
    inverse = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=torch.float64), upper=False)
    y = torch.linalg.eigh(inverse @ c_target @ inverse.T)[1]
    leading = torch.linalg.qr(inverse.T @ y[:, -k:])[0]  # the k largest μ
    projector = basis[:, :k] @ basis[:, :k].T
    assert torch.allclose(projector @ leading, leading, atol=1e-8)


def test_energy_curve_is_cumulative_and_complete():
    covariance = random_covariance(8, 20, seed=3)
    curve = energy_curve(random_orthogonal(8, seed=4), covariance)
    assert (curve[1:] >= curve[:-1] - 1e-12).all()
    assert float(curve[-1]) == pytest.approx(1.0, abs=1e-12)
    first = random_orthogonal(8, seed=4)[:, 0]
    assert float(curve[0]) == pytest.approx(float(first @ covariance @ first / torch.trace(covariance)), rel=1e-12)


@pytest.mark.parametrize(("budget", "k"), [(0.05, 0), (0.1, 1), (0.25, 2), (0.5, 3), (1.0, 3)])
def test_dim_within_budget_is_the_largest_k_that_fits(budget, k):
    assert dim_within_budget(torch.tensor([0.1, 0.2, 0.5]), budget) == k


def test_a_non_positive_ridge_is_refused():
    with pytest.raises(ValueError, match="ridge"):
        contrast_basis(torch.eye(3), torch.eye(3), ridge=0.0)


def test_a_contrast_factor_keeps_the_budgeted_leading_span_and_the_general_eigenvalues():
    """``SubspaceFactor.from_contrast`` decomposes ``C_g`` once for both: its ``P`` spans the first ``k`` columns of
    :func:`contrast_basis` (``k`` set by the held-out budget) and its stored eigenvalues are ``C_g``'s."""
    n, budget = 12, 1e-3
    c_general, c_target = random_covariance(n, 40, seed=3), random_covariance(n, 30, seed=4)
    generator = torch.Generator().manual_seed(5)
    heldout = torch.randn(25, n, generator=generator, dtype=torch.float64) * torch.logspace(
        0, -3, n, dtype=torch.float64
    )
    factor = SubspaceFactor.from_contrast(c_general, c_target, heldout, budget, basis_dtype=torch.float64)
    basis = contrast_basis(c_general, c_target)
    k = dim_within_budget(energy_curve(basis, heldout.T @ heldout), budget)
    assert 0 < k < n and factor.null_dim == k
    assert torch.allclose(factor.dense(), basis[:, :k] @ basis[:, :k].T, atol=1e-10)
    assert torch.allclose(factor.eigenvalues, torch.linalg.eigvalsh(c_general), rtol=1e-12, atol=1e-12)
    assert factor.fit_energy == pytest.approx(float(energy_curve(basis[:, :k], c_general)[-1]), rel=1e-9)
