"""A model's shapes from its config alone: the protected linears as training finds them, and the sizes the
memory terms need. No weights are loaded: the model is built on the ``meta`` device from its config.

- :func:`protected_linears`: ``(name, out, in, input group)`` of every linear the targets select, found by
  :func:`~nspo_trl.nullspace.targets.resolve_protected_layers` on the meta model (the trainer's own rule), and
  grouped the way the projector build groups them: linears whose forward receives the same input tensor
  share a projector (a one-token meta forward; ``CovarianceCollector`` does the same on real data);
- :func:`model_parameters`: the model's parameter count (a tied matrix once);
- :func:`model_shape`: hidden size, MLP width, layers, vocabulary, heads, key/value heads and head size, for
  the activation terms of ``gpu_budget``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from nspo_trl.nullspace.collect import input_groups
from nspo_trl.nullspace.targets import resolve_protected_layers


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int


def model_shape(config: dict) -> ModelShape:
    """The sizes of a decoder's config (``head_dim`` defaults to ``hidden / heads``, key/value heads to heads)."""
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        vocab=config["vocab_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
    )


@lru_cache(maxsize=8)
def _meta_model(config_json: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def meta_model(config: dict) -> torch.nn.Module:
    """The model of ``config`` on the ``meta`` device (shapes only; cached per config)."""
    return _meta_model(json.dumps(config, sort_keys=True))


def model_parameters(config: dict) -> int:
    """Parameters of the model (each tensor once: a tied ``lm_head`` is the embedding)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def protected_linears(config: dict, target_modules: list[str]) -> list[tuple[str, int, int, str]]:
    """``(name, out, in, input group)`` of every linear ``target_modules`` selects (module docstring)."""
    model = meta_model(config)
    layers = resolve_protected_layers(model, target_modules)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.linear.register_forward_pre_hook(lambda _m, args, name=layer.name: inputs.setdefault(name, args[0]))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    groups = input_groups({layer.name: inputs[layer.name] for layer in layers})  # in module order, as the build
    return [(layer.name, layer.linear.out_features, layer.linear.in_features, groups[layer.name]) for layer in layers]
