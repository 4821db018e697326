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

from nspo_trl.nullspace.access import ParameterAccess, gathered, snapshot_on_owner
from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.nullspace.sharding import all_gather_objects, all_reduce_sum, rank_and_world
from nspo_trl.nullspace.targets import ProtectedLayer, layer_kind


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
    """Keeps every protected layer's change inside its null space, on any backend.

    On creation it snapshots ``W_ref`` of each protected, non-LoRA weight (a clone in the weight's
    own dtype, so the anchor is exact) on the rank that owns the layer's input group (see
    ``sharding.py``; in a single process that is the only rank). :meth:`project_` then, layer by
    layer, gathers ``W`` onto its owner, computes ``W_ref + (W − W_ref) P`` there in IEEE float32,
    and writes the result back wherever ``access`` says the weight lives (module parameter, and
    DeepSpeed's fp32 master). Creation, :meth:`project_`, :meth:`leakage` and
    :meth:`gradient_null_fraction` are collective under ``torch.distributed``: every rank calls them.
    """

    def __init__(
        self,
        layers: Sequence[ProtectedLayer],
        projector: NullSpaceProjector,
        access: ParameterAccess | None = None,
    ) -> None:
        self.layers = list(layers)
        self.projector = projector
        self.access = access or ParameterAccess()
        self.reference: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if not layer.is_lora:
                anchor = snapshot_on_owner(layer.linear.weight, self.owner(layer))
                if anchor is not None:
                    self.reference[layer.name] = anchor

    def owner(self, layer: ProtectedLayer) -> int:
        return self.projector.owner_of(self.projector.groups[layer.name])

    def load_reference(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Replace this rank's anchors (e.g. restored from a checkpoint); names and shapes must match."""
        for name, current in self.reference.items():
            if name not in reference or reference[name].shape != current.shape:
                raise ValueError(f"reference weights do not match the protected layer {name}")
            self.reference[name] = reference[name].to(device=current.device, dtype=current.dtype).clone()

    @torch.no_grad()
    def project_(self) -> None:
        """Apply ``W ← W_ref + (W − W_ref) P`` (or ``A ← A P``) in place to every protected layer."""
        with ieee_fp32_matmul():
            for layer in self.layers:
                for param in _constrained_params(layer):
                    if param.requires_grad:  # a frozen weight never moves (same decision on every rank)
                        self._project_param(layer, param)

    def _project_param(self, layer: ProtectedLayer, param: torch.nn.Parameter) -> None:
        owner = self.owner(layer)
        current = self.access.gather(param, owner)
        new = None
        if current is not None:
            if layer.is_lora:
                new = self.projector.apply(layer.name, current)
            else:
                anchor = self.reference[layer.name].to(device=current.device, dtype=torch.float32)
                new = anchor + self.projector.apply(layer.name, current - anchor)
        self.access.scatter(param, owner, new)

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """``g ← g P`` for the gradient of every trainable constrained parameter (the paper's Eq. 6).

        Run before the optimizer step, it keeps Adam's first moment inside the null space and makes
        the step a descent direction of the projected objective (``⟨g, gP⟩ = ‖gP‖² ≥ 0``). Adam's
        per-coordinate scaling can still rotate the step out of the null space, so the weight
        projection after the step stays the exact safeguard. Collective under DDP: the owner of each
        group projects and broadcasts (gradients are already all-reduced and equal on every rank).
        """
        rank, world = rank_and_world()
        with ieee_fp32_matmul():
            for layer in self.layers:
                for param in _constrained_params(layer):
                    if not param.requires_grad or param.grad is None:
                        continue
                    owner = self.owner(layer)
                    if rank == owner:
                        grad = param.grad.float()
                        param.grad.copy_(self.projector.apply(layer.name, grad).to(param.grad.dtype))
                    if world > 1:
                        torch.distributed.broadcast(param.grad, src=owner)

    def null_bases(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Every trainable constrained parameter → its group's null basis ``U₀`` ``(n, k)`` (one per group).

        For :class:`~nspo_trl.nullspace.optimizer.NullSpaceAdamW`; needs every basis on this rank, i.e. a
        single process (under data parallelism each owner holds only its own groups').
        """
        by_group: dict[str, torch.Tensor] = {}
        bases = {}
        for layer in self.layers:
            group = self.projector.groups[layer.name]
            for param in _constrained_params(layer):
                if param.requires_grad:
                    if group not in by_group:
                        by_group[group] = self.projector.factors[group].null_basis()
                    bases[param] = by_group[group]
        return bases

    @torch.no_grad()
    def weight_delta(self, layer: ProtectedLayer) -> torch.Tensor:
        """``W − W_ref`` (``(m, n)``, float32) on the layer's owner; for LoRA the merged ``Σ s·B A``."""
        if layer.is_lora:
            deltas = [layer.lora_layer.get_delta_weight(adapter).float() for adapter in layer.lora_a]
            return torch.stack(deltas).sum(0)
        return layer.linear.weight.float() - self.reference[layer.name].to(layer.linear.weight.device).float()

    @torch.no_grad()
    @ieee_fp32_matmul()
    def leakage(self, probes: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per-layer leakage on probe rows (``probes``: group → ``(t, n)`` inputs, held by the group's owner).

        Each owner measures its layers on the module weights (gathered under ZeRO-3); the results
        are shared, so every rank returns the same dict.
        """
        rank, _ = rank_and_world()
        local = {}
        for layer in self.layers:
            with gathered(list(dict.fromkeys([layer.linear.weight, *_constrained_params(layer), *_lora_b(layer)]))):
                rows = probes.get(self.projector.groups[layer.name])
                if rank != self.owner(layer) or rows is None or rows.numel() == 0:
                    continue
                # under LoRA the base weight is never trained, so it is its own reference
                reference = layer.linear.weight if layer.is_lora else self.reference[layer.name]
                local[layer.name] = relative_leakage(self.weight_delta(layer), reference, rows)
        merged = {name: value for part in all_gather_objects(local) for name, value in part.items()}
        return {layer.name: merged[layer.name] for layer in self.layers if layer.name in merged}

    @torch.no_grad()
    def gradient_null_fraction(self) -> dict[str, float]:
        """``‖g P‖ / ‖g‖`` over the trainable constrained parameters with a visible gradient.

        Overall (``"all"``) and per layer kind (``"mlp"``, ``"attention"``, ``"other"``, e.g. ``lm_head``): how
        much of each part of the gradient the null space lets through. Kinds without a gradient are left out
        (an empty dict when none has one). Each owner measures its layers; the sums are all-reduced. Not
        available under DeepSpeed, which keeps gradients in its own partitions.
        """
        rank, _ = rank_and_world()
        kinds = ("mlp", "attention", "other")
        sums = [0.0] * (2 * len(kinds))  # kept, total per kind
        for layer in self.layers:
            if rank != self.owner(layer):
                continue
            slot = 2 * kinds.index(layer_kind(layer.name))
            for p in _constrained_params(layer):
                if p.grad is None:
                    continue
                g = p.grad.float()
                sums[slot] += float(self.projector.apply(layer.name, g).pow(2).sum())
                sums[slot + 1] += float(g.pow(2).sum())
        sums = all_reduce_sum(sums)
        fractions = {kind: (sums[2 * i] / sums[2 * i + 1]) ** 0.5 for i, kind in enumerate(kinds) if sums[2 * i + 1]}
        if total := sum(sums[1::2]):
            fractions["all"] = (sum(sums[0::2]) / total) ** 0.5
        return fractions


def _constrained_params(layer: ProtectedLayer) -> list[torch.nn.Parameter]:
    """The parameters the projection acts on: the weight, or the LoRA ``A`` matrices."""
    return list(layer.lora_a.values()) if layer.is_lora else [layer.linear.weight]


def _lora_b(layer: ProtectedLayer) -> list[torch.nn.Parameter]:
    return [m.weight for m in layer.lora_layer.lora_B.values()] if layer.is_lora else []
