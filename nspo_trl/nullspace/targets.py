"""Which layers NSPO protects, found by name.

Patterns are presets or regular expressions searched (``re.search``) in module names
normalised to the plain Transformers layout (PEFT's ``base_model.model.`` prefix and
``.base_layer`` suffix removed), e.g. ``model.layers.3.mlp.down_proj``:

- ``mlp`` (default, as the paper's code): every linear directly inside an ``mlp`` block.
- ``attention``: every linear directly inside ``self_attn``/``attention``/``attn``.
- ``full``: every ``nn.Linear`` of the model, ``lm_head`` included; all other parameters
  (embeddings, norms, biases) are frozen so outputs on preservation tokens stay unchanged
  end to end.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

PRESETS: dict[str, str] = {
    "mlp": r"(^|\.)mlp\.[^.]+$",
    "attention": r"(^|\.)(self_attn|attention|attn)\.[^.]+$",
    "full": r".*",
}
FULL_PRESET = "full"


@dataclass
class ProtectedLayer:
    """One protected linear layer.

    Attributes:
        name: normalised module name.
        linear: the ``nn.Linear`` whose input ``x ∈ R^n`` defines the null space (the base layer under LoRA).
        lora_a: under PEFT LoRA, the ``(r, n)`` ``lora_A`` weights of the trained adapters; else empty.
        lora_layer: the PEFT layer (for ``get_delta_weight``), else ``None``.
    """

    name: str
    linear: nn.Linear
    lora_a: dict[str, nn.Parameter]
    lora_layer: nn.Module | None = None

    @property
    def is_lora(self) -> bool:
        return self.lora_layer is not None


def layer_kind(name: str) -> str:
    """``"mlp"`` or ``"attention"`` when the preset of that name matches the module, else ``"other"`` (``lm_head``)."""
    for kind in ("mlp", "attention"):
        if re.search(PRESETS[kind], name):
            return kind
    return "other"


def normalize_name(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer`` → ``model.layers.0.mlp.up_proj``."""
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    return [PRESETS.get(p, p) for p in patterns]


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but keep plain models usable without it
        return None
    return LoraLayer


def resolve_protected_layers(
    model: nn.Module, patterns: Sequence[str], skip_adapters: Sequence[str] = ("ref",)
) -> list[ProtectedLayer]:
    """Find the layers matched by ``patterns`` (presets or regexes).

    Raises:
        ValueError: a pattern is not a valid regex or matches no linear layer; the model uses
            DoRA or trains LoRA biases (the update would leave the null space).
    """
    compiled = []
    for pattern, regex in zip(patterns, expand_patterns(patterns), strict=True):
        try:
            compiled.append((pattern, re.compile(regex)))
        except re.error as err:
            raise ValueError(f"nspo_target_modules: {pattern!r} is not a valid regex ({err}).") from None

    lora_type = _lora_layer_type()
    lora_layers = {n: m for n, m in model.named_modules() if lora_type is not None and isinstance(m, lora_type)}
    candidates: dict[str, tuple[nn.Linear, nn.Module | None]] = {}
    if lora_layers:
        for name, layer in lora_layers.items():
            if isinstance(layer.get_base_layer(), nn.Linear):
                candidates[normalize_name(name)] = (layer.get_base_layer(), layer)
    else:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                candidates[normalize_name(name)] = (module, None)

    if FULL_PRESET in patterns and not lora_layers:
        _drop_tied_output_embedding(model, candidates)

    matched: dict[str, ProtectedLayer] = {}
    for pattern, regex in compiled:
        hits = [name for name in candidates if regex.search(name)]
        if not hits:
            example = next(iter(candidates), "model.layers.0.mlp.down_proj")
            raise ValueError(
                f"nspo_target_modules: {pattern!r} matches no {'LoRA-wrapped ' if lora_layers else ''}linear layer "
                f"of {type(model).__name__} (names look like {example!r}); use 'mlp', 'attention', 'full' or a regex."
            )
        for name in hits:
            if name not in matched:
                linear, lora_layer = candidates[name]
                matched[name] = ProtectedLayer(name, linear, _lora_a(name, lora_layer, skip_adapters), lora_layer)
    return list(matched.values())


def _lora_a(name: str, lora_layer: nn.Module | None, skip_adapters: Sequence[str]) -> dict[str, nn.Parameter]:
    if lora_layer is None:
        return {}
    out = {}
    for adapter, module in lora_layer.lora_A.items():
        if adapter in skip_adapters:
            continue
        if lora_layer.use_dora.get(adapter, False):
            raise ValueError(
                f"use_dora: DoRA rescales columns of W + BA, so {name} would leave the null space; "
                "NSPO supports plain LoRA (set use_dora=False)."
            )
        if getattr(lora_layer, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"lora_bias: a trained LoRA bias on {name} shifts every output; set lora_bias=False.")
        out[adapter] = module.weight
    return out


def untie_output_embeddings(model: nn.Module) -> int:
    """Give an ``lm_head`` tied to the input embeddings its own weight, a copy of the shared ``(V, d)`` matrix.

    The model computes the same logits; the output layer can then be protected on its own (its inputs are
    the final hidden states) while the embeddings stay as they are. ``config.tie_word_embeddings`` is set
    to false so that ``save_pretrained`` writes both matrices and a reload keeps them apart. Returns the
    number of parameters added (``V · d``), 0 when the model was not tied.
    """
    out = tied_output_embedding(model)
    if out is None:
        return 0
    shared = out.weight
    out.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers' record of which weights are shared
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return out.weight.numel()


def tied_output_embedding(model: nn.Module) -> nn.Module | None:
    """The output layer (``lm_head``) when it shares its weight with the input embeddings, else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return None
    out, inp = get_out(), get_in()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return out


def _drop_tied_output_embedding(model: nn.Module, candidates: dict) -> None:
    """Under ``full``, an ``lm_head`` tied to the input embeddings cannot be protected on its own."""
    out = tied_output_embedding(model)
    if out is None:
        return
    for name, (linear, _) in list(candidates.items()):
        if linear is out:
            del candidates[name]
            logger.warning(
                "NSPO 'full' preset: %s is tied to the input embeddings, so it stays frozen with them "
                "(set nspo_untie_word_embeddings to let NSPO train it inside its own null space).",
                name,
            )
