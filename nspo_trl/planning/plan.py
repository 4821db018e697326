"""Per-rank memory and communication of a recipe, from its model config alone (no weights are loaded).

    python -m nspo_trl.planning recipes/qwen7b.yaml --num-processes 8 [--backend zero3|zero2|ddp]

The protected linears, their input widths ``n`` and which of them share a projector (an input group)
come from the model itself, built on the ``meta`` device from its config (``shapes.py``): for a Llama or
Qwen2 decoder, q/k/v_proj share one (``n = h``), gate/up_proj one (``n = h``), o_proj has ``n = a·d``,
down_proj ``n = f``, an untied lm_head ``n = h``. Sizes are in GiB (2³⁰ bytes) throughout.

Figures per rank, as this version stores them (``sharding.py``): each input group has one owner
rank holding the ``W_ref`` of its layers (in the weights' dtype: bf16 under DeepSpeed mixed
precision) and its fp32 thin basis ``n × min(k, n − k)``, at most ``n · ⌊n/2⌋`` (null fraction 1/2;
the real size depends on the data). The largest rank's share is printed. Extra communication per
projection step, per rank, for ``P`` protected parameters (``P_r`` owned by the rank), fp32:

    zero3: gather + scatter of its partitions, 8·P/N, plus its owned weights through it, 8·P_r·(N−1)/N
    zero2: DeepSpeed's full-fp32 all-reduce, 8·P·(N−1)/N, plus the owners' broadcasts, 4·P
    ddp:   the owners' broadcasts, 4·P

Beside them, the reference code's layout: a dense fp32 ``n × n`` ``P`` per protected linear plus
an fp32 ``W_ref``, on every rank, and no extra communication (every rank projects everything).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from nspo_trl.models.tiny_model import tiny_model_shape
from nspo_trl.nullspace.collect import covariance_chunks
from nspo_trl.nullspace.sharding import assign_owners, group_costs, rank_loads
from nspo_trl.planning.gpu_budget import GiB, Launch, contrast_host_bytes, eigh_host_bytes, gpu_budget, verdict
from nspo_trl.planning.shapes import protected_linears

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "auto": 2}


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


def memory_plan(
    config: dict,
    target_modules: list[str],
    weight_bytes: int,
    covariance_dtype: str,
    lora: bool = False,
    num_processes: int = 1,
    backend: str = "ddp",
    build_memory_gb: float = 8.0,
    covariance_copies: int = 1,
    contrast: bool = False,
) -> dict[str, float]:
    """Bytes of each item on the most loaded rank (see the module docstring); LoRA keeps no ``W_ref``.

    ``covariance_copies`` (``NSPOConfig.build_covariance_copies``): covariances held per group at once, so a
    pass covers the groups that fit ``1/copies`` of the build budget; ``contrast``: the subspace's
    decomposition workspace (``gpu_budget.contrast_host_bytes``) instead of one ``eigh``'s."""
    linears = protected_linears(config, target_modules)
    widths = {group: n for _, _, n, group in linears}
    costs = group_costs(((g, 0 if lora else m, n) for _, m, n, g in linears), weight_bytes)
    owners = assign_owners(costs, num_processes)
    loads = rank_loads(costs, owners, num_processes)
    busiest = max(range(num_processes), key=lambda r: loads[r])
    element = DTYPE_BYTES[covariance_dtype]
    passes = covariance_chunks(widths, element, int(build_memory_gb * 2**30) // covariance_copies)
    params = sum(m * n for _, m, n, _ in linears)
    owned_params = 0 if lora else sum(m * n for _, m, n, g in linears if owners[g] == busiest)
    n = num_processes
    communication = {
        "zero3": 8 * params / n + 8 * owned_params * (n - 1) / n,
        "zero2": 8 * params * (n - 1) / n + 4 * params,
        "ddp": 4 * params,
    }[backend]
    return {
        "protected_linears": len(linears),
        "protected_params": params,
        "input_groups": len(widths),
        "w_ref": owned_params * weight_bytes,
        "projector_max": sum(widths[g] * (widths[g] // 2) * 4 for g, r in owners.items() if r == busiest),
        "communication": communication if n > 1 else 0,
        "covariances_all": covariance_copies * sum(w * w * DTYPE_BYTES[covariance_dtype] for w in widths.values()),
        # the build runs one pass over the preservation data per chunk; a rank holds one chunk at a time
        "build_passes": len(passes),
        "covariances_build": covariance_copies * max(sum(widths[g] ** 2 * element for g in chunk) for chunk in passes),
        "widest_owned_group": max(widths.values()),  # any rank may own it: the eigh peak is its
        "decomposition": (contrast_host_bytes if contrast else eigh_host_bytes)(max(widths.values())),
        "widest_weight": max(m * n_in for _, m, n_in, _ in linears),
        "reference_dense_p": sum(n_in * n_in * 4 for _, _, n_in, _ in linears),
        "reference_w_ref": params * 4,
    }


def print_plan(
    script_args, training_args, model_args, num_processes: int = 1, backend: str = "ddp", gpu_memory_gib=None
) -> bool:
    """Print :func:`plan_report`'s lines; returns whether every phase fits."""
    lines, fits = plan_report(script_args, training_args, model_args, num_processes, backend, gpu_memory_gib)
    print("\n".join(lines))
    return fits


def plan_report(
    script_args, training_args, model_args, num_processes: int = 1, backend: str = "ddp", gpu_memory_gib=None
) -> tuple[list[str], bool]:
    """The plan's lines; with ``gpu_memory_gib``, also the whole per-GPU budget by phase, and whether it fits."""
    backend = backend if num_processes > 1 else "ddp"  # one process shards nothing
    out: list[str] = []
    tiny = (script_args.tiny_hidden_size, script_args.tiny_intermediate_size) if script_args.build_tiny_model else None
    config = model_config(model_args.model_name_or_path, tiny)
    if config is None:
        out.append(f"plan: no config for {model_args.model_name_or_path} on this machine (offline); figures skipped.")
        return out, True
    deepspeed_bf16 = backend.startswith("zero") and training_args.bf16
    weight_bytes = 2 if deepspeed_bf16 else DTYPE_BYTES.get(model_args.dtype or "float32", 4)
    plan = memory_plan(
        config,
        training_args.nspo_target_modules,
        weight_bytes,
        training_args.nspo_covariance_dtype,
        lora=model_args.use_peft,
        num_processes=num_processes,
        backend=backend,
        build_memory_gb=training_args.nspo_build_memory_gb,
        covariance_copies=training_args.build_covariance_copies,
        contrast=training_args.nspo_subspace == "contrast",
    )
    ours = plan["w_ref"] + plan["projector_max"]
    reference = plan["reference_w_ref"] + plan["reference_dense_p"]
    params = plan["protected_params"]
    where = f"{num_processes} process{'es' if num_processes > 1 else ''}" + (
        f" ({backend})" if num_processes > 1 else ""
    )
    out.append(f"plan for {model_args.model_name_or_path} on {where}: {plan['protected_linears']} protected linears "
          f"({params / 1e9:.3f} B params) in {plan['input_groups']} input groups")  # fmt: skip
    out.append(f"  per process, nspo_trl : W_ref {size(plan['w_ref'])} + projector <= {size(plan['projector_max'])}"
          f" = {size(ours)} (most loaded rank)")  # fmt: skip
    out.append(f"  per process, reference: W_ref {size(plan['reference_w_ref'])} + dense P "
          f"{size(plan['reference_dense_p'])} = {size(reference)}")  # fmt: skip
    if num_processes > 1:
        out.append(f"  ratio reference / nspo_trl: {reference / ours:.1f}x")
        out.append(f"  extra communication per projection step: {size(plan['communication'])} per process (fp32)")
    dtype = training_args.nspo_covariance_dtype
    out.append(f"  covariances while building: {size(plan['covariances_build'])} per process at most ({dtype}), "
          f"{size(plan['covariances_all'])} in all, in {plan['build_passes']} pass(es) over the preservation data "
          f"(nspo_build_memory_gb {training_args.nspo_build_memory_gb:g}: fewer passes need more memory)")  # fmt: skip
    if gpu_memory_gib is None:
        return out, True
    launch = Launch(
        num_processes=num_processes,
        backend=backend,
        gpu_memory_gib=gpu_memory_gib,
        weight_bytes=weight_bytes,
        lora=bool(model_args.use_peft),
        micro_batch=training_args.per_device_train_batch_size,
        prompt_length=getattr(training_args, "max_prompt_length", None) or 512,
        completion_length=training_args.max_completion_length,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        preservation_batch=training_args.nspo_preservation_batch_size,
        preservation_length=training_args.nspo_preservation_max_length,
        vllm_colocate=bool(training_args.use_vllm and training_args.vllm_mode == "colocate"),
        vllm_sleep=bool(training_args.vllm_enable_sleep_mode),
        vllm_utilization=training_args.vllm_gpu_memory_utilization,
        eigh_on_cpu=training_args.nspo_eigh_on_cpu,
        projector_offload=training_args.nspo_projector_offload,
    )
    budget = gpu_budget(config, launch, plan)
    if training_args.nspo_eigh_on_cpu:
        host = plan["decomposition"] / GiB
        out.append(f"  eigh on the CPU (nspo_eigh_on_cpu): {host:.1f} GiB of host RAM per process, not on the GPU")
    if training_args.nspo_projector_offload:
        offloaded = plan["projector_max"] / GiB
        out.append(f"  projector in host RAM (nspo_projector_offload): {offloaded:.1f} GiB per process at most, each "
              "basis copied to the GPU while applied (that much host-to-GPU traffic per projection)")  # fmt: skip
    out.append(f"  per-GPU budget ({gpu_memory_gib:g} GiB GPU):")
    for phase, terms in budget.items():
        cells = ", ".join(f"{term} {value / GiB:.1f}" for term, value in terms.items() if value)
        out.append(f"    {phase:<10} {sum(terms.values()) / GiB:6.1f} GiB = {cells}")
    lines = verdict(budget, gpu_memory_gib)
    out += [f"  {line}" for line in lines]
    return out, all(line.endswith("FITS") for line in lines)


def size(num_bytes: float) -> str:
    return f"{num_bytes / GiB:8.2f} GiB" if num_bytes >= GiB else f"{num_bytes / 2**20:8.2f} MiB"
