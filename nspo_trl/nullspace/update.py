"""The constrained update applied after every optimizer step, and the leakage it guarantees.

For a protected weight ``W ∈ R^{m×n}`` with reference ``W_ref`` and projector ``P``:

    W ← W_ref + (W − W_ref) P

Because ``P`` is an idempotent projector, applying this after each step equals projecting
each step's update, whatever the optimizer did (Adam moments, weight decay, clipping). For
LoRA (``ΔW = s·B A``, ``A ∈ R^{r×n}``): ``A ← A P`` makes ``ΔW P = ΔW`` for any ``B``, with
no reference copy needed.

Leakage of a layer on preservation inputs ``X ∈ R^{t×n}`` (rows are tokens):

    ℓ = ‖X (W − W_ref)ᵀ‖_F / ‖X W_refᵀ‖_F

which is ≈ 0 when the update lies in the null space of ``Xᵀ X``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.nullspace.targets import ProtectedLayer


@contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Run CUDA float32 matmuls in full IEEE precision inside the block.

    With TF32 on (``--tf32 true``), ``D P`` would carry ~1e-3 relative error in every direction,
    i.e. leak into the preserved subspace; the projection is cheap enough to always run exactly.
    The matmul backend's own setting is restored exactly: where it only inherited the global
    ``torch.backends.fp32_precision`` (it then reads back as the global value), it inherits again.
    """
    matmul = torch.backends.cuda.matmul
    inherited = matmul.fp32_precision == torch.backends.fp32_precision
    previous = "none" if inherited else matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def relative_leakage(delta: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor) -> float:
    """``‖rows · deltaᵀ‖ / ‖rows · referenceᵀ‖`` with ``delta``/``reference`` ``(m, n)`` and ``rows`` ``(t, n)``."""
    rows = rows.to(device=delta.device, dtype=torch.float32)
    moved = (rows @ delta.float().T).norm()
    base = (rows @ reference.float().T).norm()
    return float(moved / base) if base > 0 else float("nan")


class ConstrainedUpdate:
    """Keeps every protected layer's change inside its null space.

    On creation it snapshots ``W_ref`` (a clone of each protected, non-LoRA weight, same dtype
    and device, so the anchor is exact); :meth:`project_` then applies the update in float32.
    """

    def __init__(self, layers: Sequence[ProtectedLayer], projector: NullSpaceProjector) -> None:
        self.layers = list(layers)
        self.projector = projector
        self.reference: dict[str, torch.Tensor] = {
            layer.name: layer.linear.weight.detach().clone() for layer in self.layers if not layer.is_lora
        }

    def load_reference(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Replace the anchors (e.g. restored from a checkpoint); names and shapes must match."""
        for name, current in self.reference.items():
            if name not in reference or reference[name].shape != current.shape:
                raise ValueError(f"reference weights do not match the protected layer {name}")
            self.reference[name] = reference[name].to(device=current.device, dtype=current.dtype).clone()

    @torch.no_grad()
    def project_(self) -> None:
        """Apply ``W ← W_ref + (W − W_ref) P`` (or ``A ← A P``) in place to every protected layer."""
        with ieee_fp32_matmul():
            self._project_all()

    def _project_all(self) -> None:
        for layer in self.layers:
            if layer.is_lora:
                for a in layer.lora_a.values():
                    a.copy_(self.projector.apply(layer.name, a.float()).to(a.dtype))
                continue
            weight = layer.linear.weight
            anchor = self.reference[layer.name].float()
            delta = self.projector.apply(layer.name, weight.float() - anchor)
            weight.copy_((anchor + delta).to(weight.dtype))

    @torch.no_grad()
    def weight_delta(self, layer: ProtectedLayer) -> torch.Tensor:
        """``W − W_ref`` (``(m, n)``, float32); for LoRA the merged ``Σ s·B A`` of the trained adapters."""
        if layer.is_lora:
            deltas = [layer.lora_layer.get_delta_weight(adapter).float() for adapter in layer.lora_a]
            return torch.stack(deltas).sum(0)
        return layer.linear.weight.float() - self.reference[layer.name].float()

    @torch.no_grad()
    @ieee_fp32_matmul()
    def leakage(self, probes: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per-layer leakage on probe rows; ``probes`` maps each projector group to ``(t, n)`` inputs."""
        out = {}
        for layer in self.layers:
            rows = probes.get(self.projector.groups[layer.name])
            if rows is None or rows.numel() == 0:
                continue
            # under LoRA the base weight is never trained, so it is its own reference
            reference = layer.linear.weight if layer.is_lora else self.reference[layer.name]
            out[layer.name] = relative_leakage(self.weight_delta(layer), reference, rows)
        return out

    @torch.no_grad()
    def gradient_null_fraction(self) -> float | None:
        """``‖g P‖ / ‖g‖`` over all constrained parameters with a gradient (None if none is visible)."""
        kept = total = 0.0
        for layer in self.layers:
            params = list(layer.lora_a.values()) if layer.is_lora else [layer.linear.weight]
            for p in params:
                if p.grad is None:
                    continue
                g = p.grad.float()
                kept += float(self.projector.apply(layer.name, g).pow(2).sum())
                total += float(g.pow(2).sum())
        return (kept / total) ** 0.5 if total > 0 else None
