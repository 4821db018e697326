"""Memory figures of a recipe, from its model config alone (no weights are loaded).

For a decoder with hidden size ``h``, MLP width ``f``, ``L`` layers, ``a`` attention heads of size
``d`` and ``kv`` key/value heads, the protected linears and their input widths ``n`` are

    q/k/v_proj: n = h (one shared projector)     o_proj: n = a·d
    gate/up_proj: n = h (one shared projector)   down_proj: n = f        lm_head: n = h

Figures per process, as this version stores them:

- ``W_ref``: every protected weight, in the load dtype;
- projector: thin bases ``n × min(k, n − k)`` in fp32, at most ``n · ⌊n/2⌋`` per input group
  (the worst case, null fraction 1/2; the real size depends on the data);
- covariances while building: one ``n × n`` per input group in the accumulation dtype.

Beside them, the reference code's layout: a dense fp32 ``n × n`` ``P`` per protected linear plus
an fp32 ``W_ref``, on every process.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from nspo_trl.nullspace.targets import expand_patterns
from nspo_trl.tiny_model import tiny_model_shape

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "auto": 2}
GiB = 2**30


def shipped_config(model: str) -> dict | None:
    path = Path(str(resources.files("nspo_trl") / "resources" / "model_configs" / f"{model.split('/')[-1]}.json"))
    return json.loads(path.read_text()) if path.is_file() else None


def model_config(model: str, tiny: tuple[int, int] | None = None) -> dict | None:
    """The config of ``model``: a local ``config.json``, a config shipped with the package, or the tiny model's."""
    local = Path(model) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if tiny is not None:
        hidden, intermediate = tiny
        return tiny_model_shape(hidden_size=hidden, intermediate_size=intermediate)
    return shipped_config(model)


def protected_linears(config: dict, target_modules: list[str]) -> list[tuple[str, int, int, str]]:
    """``(name, out, in, input group)`` of every linear the targets select, for a Llama/Qwen2-shaped config."""
    h, f = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim") or h // heads
    linears = []
    for i in range(config["num_hidden_layers"]):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        linears += [
            (f"{attn}.q_proj", heads * d, h, f"{attn}.q_proj"),
            (f"{attn}.k_proj", kv * d, h, f"{attn}.q_proj"),
            (f"{attn}.v_proj", kv * d, h, f"{attn}.q_proj"),
            (f"{attn}.o_proj", h, heads * d, f"{attn}.o_proj"),
            (f"{mlp}.gate_proj", f, h, f"{mlp}.gate_proj"),
            (f"{mlp}.up_proj", f, h, f"{mlp}.gate_proj"),
            (f"{mlp}.down_proj", h, f, f"{mlp}.down_proj"),
        ]
    if not config.get("tie_word_embeddings", False):
        linears.append(("lm_head", config["vocab_size"], h, "lm_head"))
    patterns = [re.compile(p) for p in expand_patterns(target_modules)]
    return [entry for entry in linears if any(p.search(entry[0]) for p in patterns)]


def memory_plan(
    config: dict, target_modules: list[str], load_dtype: str, covariance_dtype: str, lora: bool = False
) -> dict[str, float]:
    """Bytes per process of each item (see the module docstring); LoRA keeps no ``W_ref`` (``A ← A P``)."""
    linears = protected_linears(config, target_modules)
    groups = {group: n for _, _, n, group in linears}
    weight_bytes = DTYPE_BYTES.get(load_dtype, 4)
    return {
        "protected_linears": len(linears),
        "protected_params": sum(m * n for _, m, n, _ in linears),
        "input_groups": len(groups),
        "w_ref": 0 if lora else sum(m * n for _, m, n, _ in linears) * weight_bytes,
        "projector_max": sum(n * (n // 2) * 4 for n in groups.values()),
        "covariances_build": sum(n * n * DTYPE_BYTES[covariance_dtype] for n in groups.values()),
        "reference_dense_p": sum(n * n * 4 for _, _, n, _ in linears),
        "reference_w_ref": sum(m * n for _, m, n, _ in linears) * 4,
    }


def print_plan(script_args, training_args, model_args) -> None:
    tiny = (script_args.tiny_hidden_size, script_args.tiny_intermediate_size) if script_args.build_tiny_model else None
    config = model_config(model_args.model_name_or_path, tiny)
    if config is None:
        print(f"plan: no config for {model_args.model_name_or_path} on this machine (offline); figures skipped.")
        return
    plan = memory_plan(
        config,
        training_args.nspo_target_modules,
        model_args.dtype or "float32",
        training_args.nspo_covariance_dtype,
        lora=model_args.use_peft,
    )
    ours = plan["w_ref"] + plan["projector_max"]
    reference = plan["reference_w_ref"] + plan["reference_dense_p"]
    params = plan["protected_params"]
    print(f"plan for {model_args.model_name_or_path}: {plan['protected_linears']} protected linears "
          f"({params / 1e9:.3f} B params) in {plan['input_groups']} input groups")  # fmt: skip
    print(f"  per process, nspo_trl : W_ref {size(plan['w_ref'])} + projector <= {size(plan['projector_max'])}"
          f" = {size(ours)}")  # fmt: skip
    print(f"  per process, reference: W_ref {size(plan['reference_w_ref'])} + dense P "
          f"{size(plan['reference_dense_p'])} = {size(reference)}")  # fmt: skip
    dtype = training_args.nspo_covariance_dtype
    print(f"  covariances while building: {size(plan['covariances_build'])} ({dtype})")


def size(num_bytes: float) -> str:
    return f"{num_bytes / GiB:8.2f} GiB" if num_bytes >= GiB else f"{num_bytes / 2**20:8.2f} MiB"
