"""What is frozen so that every trained change stays where the projection can keep it.

- :func:`freeze_unconstrainable`: a protected layer with no free direction (``null_dim = 0``) is frozen;
  biases of protected linears are frozen (a bias shift ``Δb`` moves every output, ``y = W x + b``); under a
  preset that protects every linear (``full``), every parameter the projection does not cover (embeddings,
  norms) is frozen too, so outputs on preservation inputs stay unchanged end to end.
- :func:`freeze_unmatched`: ``nspo_trainable_parameters``, train only the parameters whose names match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from torch import nn

from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.nullspace.targets import ProtectedLayer

logger = logging.getLogger(__name__)


def freeze_unconstrainable(
    model: nn.Module, layers: Sequence[ProtectedLayer], projector: NullSpaceProjector, freeze_others: bool
) -> None:
    """Freeze what the projection cannot keep in the null space; ``freeze_others``: every non-protected parameter.

    Under LoRA the constrained parameters are ``lora_A`` (projected, ``A ← A P``) and ``lora_B`` (free: ``ΔW = B A``
    stays in the null space whatever ``B`` is). Raises ``ValueError`` when nothing trainable is left.
    """
    constrained: set[int] = set()
    for layer in layers:
        frozen = projector.factor_for(layer.name).null_dim == 0
        if layer.is_lora:
            for a in layer.lora_a.values():
                a.requires_grad_(not frozen and a.requires_grad)
                constrained.add(id(a))
            constrained.update(id(m.weight) for m in layer.lora_layer.lora_B.values())
            continue
        layer.linear.weight.requires_grad_(not frozen and layer.linear.weight.requires_grad)
        constrained.add(id(layer.linear.weight))
        if layer.linear.bias is not None:
            layer.linear.bias.requires_grad_(False)  # a bias shift moves every output
    if frozen := projector.frozen_modules():
        logger.warning(
            "NSPO: %d layers have no free direction (an empty null space, or no contrast direction within "
            "nspo_contrast_budget) and are frozen: %s",
            len(frozen),
            frozen,
        )
    if freeze_others:
        for _, param in model.named_parameters():
            if id(param) not in constrained:
                param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "nspo_alpha: every trainable parameter ended up frozen (no null space anywhere); "
            "raise nspo_alpha, set nspo_energy, or use fewer preservation samples."
        )


def freeze_unmatched(model: nn.Module, patterns: Sequence[str]) -> None:
    """Freeze every parameter none of whose names (a tied weight has two) matches a regex of ``patterns``."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied weight under both names
        names.setdefault(id(param), []).append(name)
    unmatched = [p for p in patterns if not any(re.search(p, n) for group in names.values() for n in group)]
    if unmatched:
        raise ValueError(
            f"nspo_trainable_parameters: {unmatched[0]!r} matches no parameter name "
            f"(e.g. {next(iter(names.values()))[0]!r}); fix the regex."
        )
    for param in model.parameters():
        if not any(re.search(p, n) for p in patterns for n in names[id(param)]):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "nspo_trainable_parameters: every parameter it matches is frozen by the NSPO preset "
            "(e.g. embeddings and norms under 'full'); match protected weights or use another preset."
        )
