"""The null-space math of NSPO, usable without the trainer.

- :class:`CovarianceCollector` / :func:`run_collection`: forward hooks that stream ``C = Σ x xᵀ`` per
  input group on preservation data (shared inputs detected, padding masked);
- :class:`NullSpaceRule`: which eigenvalues count as null (``λ ≤ α·λmax``, energy, rank cap);
- :class:`NullSpaceProjector` / :class:`SubspaceFactor`: thin factors of ``P``, ``apply(D) → D P``, save/load;
- :class:`ConstrainedUpdate`: ``W ← W_ref + (W − W_ref) P`` (LoRA: ``A ← A P``) on any backend, and leakage;
- :class:`NullSpaceAdamW`: AdamW in each protected weight's null-space coordinates;
- :func:`resolve_protected_layers`: presets (``mlp``, ``attention``, ``full``) and regexes → protected linears.
"""

from nspo_trl.nullspace.collect import CovarianceCollector, run_collection
from nspo_trl.nullspace.optimizer import NullSpaceAdamW
from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.targets import ProtectedLayer, resolve_protected_layers
from nspo_trl.nullspace.update import ConstrainedUpdate, relative_leakage

__all__ = [
    "ConstrainedUpdate",
    "CovarianceCollector",
    "NullSpaceAdamW",
    "NullSpaceProjector",
    "NullSpaceRule",
    "ProtectedLayer",
    "SubspaceFactor",
    "relative_leakage",
    "resolve_protected_layers",
    "run_collection",
]
