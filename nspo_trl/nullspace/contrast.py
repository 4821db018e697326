"""Subspaces chosen by contrast: directions one set of inputs uses and another does not.

NSPO's null space takes the eigenvectors of the preservation covariance ``C_g`` with the smallest
eigenvalues, whatever the training inputs do there. The contrast subspace takes, at the same budget of
general-input energy, the directions the training inputs (covariance ``C_h``) use most relative to the
general ones: the leading generalised eigenvectors of the pencil ``C_h v = μ (C_g + εI) v``.

For an orthonormal basis ``S`` (``(n, k)``) and inputs ``X`` with covariance ``C = Σ x xᵀ``, the share of
input energy in ``span S`` is ``e = tr(Sᵀ C S) / tr C``. An update restricted to the subspace,
``ΔW = ΔW S Sᵀ``, changes a layer's output on ``x`` by ``ΔW S Sᵀ x``, so ``e`` bounds how much of the
inputs' energy it can act on (measured by ``benchmarks/harm_contrast.py``).
"""

from __future__ import annotations

import torch

CONTRAST_RIDGE = 1e-7
"""``ε / λ_max(C_g)`` of the pencil: small enough that directions general inputs never use rank first."""


def energy_curve(basis: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``e(k) = Σ_{i<k} bᵢᵀ C bᵢ / tr C`` for ``k = 1..d``: energy share of the first ``k`` columns of ``basis``.

    Args:
        basis: ``(n, d)`` with orthonormal columns.
        covariance: symmetric PSD ``(n, n)``.

    Returns:
        ``(d,)``, non-decreasing, in ``[0, 1]`` up to round-off.
    """
    per_direction = ((covariance @ basis) * basis).sum(0)
    return per_direction.cumsum(0) / torch.trace(covariance)


def contrast_basis(c_general: torch.Tensor, c_target: torch.Tensor, ridge: float = CONTRAST_RIDGE) -> torch.Tensor:
    """Orthonormal ``(n, n)`` basis whose first ``k`` columns span the ``k`` leading generalised eigenvectors.

    The pencil is ``C_t v = μ (C_g + εI) v`` with ``ε = ridge · λ_max(C_g)`` (so directions general inputs
    never use have a finite, large ``μ``). With ``C_g = U Λ Uᵀ`` and the whitening ``W = U (Λ + ε)^(-1/2)``
    it is ``eigh(Wᵀ C_t W) w = μ w`` and ``v = W w``; the ``v`` (not orthogonal) are taken by descending
    ``μ`` and orthonormalised by QR, which keeps every leading span.

    Args:
        c_general: ``(n, n)`` covariance of the inputs to leave alone (the preservation data).
        c_target: ``(n, n)`` covariance of the inputs to act on (e.g. the training prompts).
        ridge: ``ε / λ_max(C_g)``, > 0.
    """
    c_general = c_general.to(torch.float64)
    return contrast_basis_from_eigh(*torch.linalg.eigh(c_general), c_target, ridge)


def contrast_basis_from_eigh(
    lam: torch.Tensor, vectors: torch.Tensor, c_target: torch.Tensor, ridge: float = CONTRAST_RIDGE
) -> torch.Tensor:
    """:func:`contrast_basis` from ``C_g``'s float64 eigendecomposition ``(Λ ascending, U)``, for callers that keep
    the eigenvalues too (one ``O(n³)`` decomposition instead of two)."""
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}.")
    whiten = vectors * (lam.clamp_min(0.0) + ridge * float(lam[-1])).rsqrt()
    c_target = c_target.to(torch.float64)
    w = torch.linalg.eigh(whiten.T @ c_target @ whiten)[1]
    q, _ = torch.linalg.qr(whiten @ w.flip(-1))  # descending μ
    return q


def dim_within_budget(curve: torch.Tensor, budget: float) -> int:
    """The largest ``k`` with ``curve[k − 1] ≤ budget`` for a non-decreasing energy curve (0 if none)."""
    return int((curve <= budget).sum())
