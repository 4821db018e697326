"""AdamW run in each protected layer's null-space coordinates (``nspo_null_space_adamw``).

Projecting an AdamW *step* after the fact (the default) keeps the weights exact, but Adam's
per-coordinate scaling ``m̂ / √v̂`` is taken in the weight's own coordinates, where the null space
is not axis-aligned: part of every step points out of it and is thrown away, and the moments keep
pushing there. Projecting the gradient first (``nspo_project_gradients``, the paper's Eq. 6) keeps
the first moment inside, but not the division by ``√v̂``.

:class:`NullSpaceAdamW` instead reparameterises each protected weight as ``W = W_ref + A U₀ᵀ``,
with ``U₀`` ``(n, k)`` an orthonormal basis of its null space, and runs AdamW on ``A`` ``(m, k)``:

    c = G U₀                                  (m, k)   the gradient of A, since ∂L/∂A = (∂L/∂W) U₀
    m ← β₁ m + (1 − β₁) c,   v ← β₂ v + (1 − β₂) c²
    W ← W − lr · (m̂ / (√v̂ + ε)) U₀ᵀ − lr · λ · W U₀ U₀ᵀ

Every step lies in the null space exactly (``Δ U_r = 0``), nothing of it is discarded by the
weight projection (which stays as a round-off safeguard), and the moments are ``(m, k)``, i.e.
``k / n`` of AdamW's memory for the layer. Under LoRA the constrained ``A`` matrices ``(r, n)``
are treated the same way. Parameters without a basis (norms, embeddings, layers outside the
preset) get plain AdamW. Decoupled weight decay is projected like the step, so it never moves
general-input outputs either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from nspo_trl.nullspace.update import ieee_fp32_matmul


class NullSpaceAdamW(torch.optim.Optimizer):
    """AdamW whose moments, steps and decay live in the null space of each constrained parameter.

    Args:
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
        null_bases: constrained parameter → its input space's null basis ``U₀`` ``(n, k)`` with
            orthonormal columns (``n`` = the parameter's last dimension). Parameters not in the map
            are updated by plain AdamW.
        lr, betas, eps, weight_decay: as for :class:`torch.optim.AdamW`.
    """

    def __init__(
        self,
        params: Iterable,
        null_bases: Mapping[torch.nn.Parameter, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"NullSpaceAdamW: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.null_bases: dict[torch.nn.Parameter, torch.Tensor] = {}
        for param, basis in null_bases.items():
            if basis.dim() != 2 or basis.shape[0] != param.shape[-1]:
                raise ValueError(
                    f"NullSpaceAdamW: a null basis of shape {tuple(basis.shape)} does not fit a parameter of shape "
                    f"{tuple(param.shape)} (it must be (in_features, k))."
                )
            self.null_bases[param] = basis.to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with ieee_fp32_matmul():
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        self._update(param, group)
        return loss

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, decay = group["lr"], group["weight_decay"]
        basis = self.null_bases.get(param)
        grad = param.grad.float()
        coordinates = grad if basis is None else grad @ basis  # (…, n) or (…, k)
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(coordinates)
            state["exp_avg_sq"] = torch.zeros_like(coordinates)
        state["step"] += 1
        step = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(coordinates, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(coordinates, coordinates, value=1 - beta2)
        denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        direction = (exp_avg / (1 - beta1**step)) / denominator
        weights = param.float()
        change = -lr * (direction if basis is None else direction @ basis.T)
        if decay:
            kept = weights if basis is None else (weights @ basis) @ basis.T
            change -= lr * decay * kept
        param.copy_((weights + change).to(param.dtype))
