"""Which eigen-directions of a preservation covariance count as "null".

For a protected linear layer with inputs ``x ∈ R^n`` collected on preservation data,
``C = Σ_t x_t x_tᵀ`` has eigenvalues ``λ_1 ≤ … ≤ λ_n`` (``torch.linalg.eigh`` order).
Every rule below selects a *prefix* of that ascending order, i.e. the ``k`` directions with
the smallest eigenvalues; ``k`` is the null dimension and ``P = U_{:k} U_{:k}ᵀ``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class NullSpaceRule:
    """Selects the null dimension ``k`` of a layer from the eigenvalues of its covariance.

    Criteria (a direction is null only if *every* active criterion calls it null, so the
    combined rule is the most conservative of them, which favours preservation):

    - ``alpha`` (relative threshold, always active): ``λ_i ≤ alpha · λ_max``. The paper's
      reference code uses ``alpha = 5e-5``.
    - ``energy`` (optional, in (0, 1]): the fewest top directions whose eigenvalues sum to at
      least ``energy · Σλ`` span the range; the others are null.
    - ``max_null_rank`` (optional): at most that many null directions.
    """

    alpha: float = 5e-5
    energy: float | None = None
    max_null_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"nspo_alpha must lie in (0, 1), got {self.alpha}; the paper uses 5e-5.")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"nspo_energy must lie in (0, 1] or be unset, got {self.energy}; try 0.9999.")
        if self.max_null_rank is not None and self.max_null_rank < 0:
            raise ValueError(f"nspo_max_null_rank must be >= 0 or unset, got {self.max_null_rank}.")

    def null_dim(self, eigenvalues: torch.Tensor) -> int:
        """Return ``k`` for eigenvalues sorted ascending (shape ``(n,)``, any float dtype).

        Tiny negative eigenvalues from round-off are treated as zero.
        """
        lam = eigenvalues.detach().to(torch.float64).clamp_min(0.0)
        n = lam.numel()
        lam_max = float(lam[-1]) if n else 0.0
        if lam_max <= 0.0:
            raise ValueError("covariance is zero: the layer received no preservation tokens")
        k = int((lam <= self.alpha * lam_max).sum())
        if self.energy is not None:
            # top-down cumulative energy; range = fewest top directions reaching the target
            top_down = torch.flip(lam, dims=[0]).cumsum(0)
            range_dim = int((top_down < self.energy * top_down[-1]).sum()) + 1
            k = min(k, n - min(range_dim, n))
        if self.max_null_rank is not None:
            k = min(k, self.max_null_rank)
        return k

    def to_dict(self) -> dict:
        return asdict(self)
