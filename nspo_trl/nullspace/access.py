"""Reading a protected weight onto its owner rank and writing the owner's new value back, per backend.

The projection ``W ← W_ref + (W − W_ref) P`` must change the weight *everywhere it lives*, or the
optimizer undoes it at the next step:

- single process and DDP: the module parameter is the weight (replicated on every rank);
- DeepSpeed ZeRO-1/2: the optimizer's fp32 master (flat partitions across ranks) *and* the
  module parameter (bf16/fp32, replicated);
- DeepSpeed ZeRO-3: the fp32 master partition *and* the module parameter's partition
  ``param.ds_tensor`` (both ``p = ceil(numel / N)`` elements of the flattened weight, rank ``r``
  holding elements ``[r·p, (r + 1)·p)``), plus the full module copy where DeepSpeed keeps one
  (persistent small parameters).

Every method is collective: all ranks call it for the same parameter in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from nspo_trl.nullspace.sharding import broadcast_tensor, collective_device, rank_and_world


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or engine init)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_zero3_param(param) else param.shape


@contextmanager
def gathered(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole on every rank inside the block (read-only); no-op otherwise."""
    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextmanager
def gathered_one_module_at_a_time(model: nn.Module) -> Iterator[None]:
    """ZeRO-3: during forward passes inside the block, each module's own partitioned parameters are gathered
    just before it runs and released right after, so a rank holds one module whole at a time (the
    largest: the embeddings or ``lm_head``), never the whole model; no-op otherwise.

    Gathering is collective: every rank must run the same number of forward passes (see
    ``NSPOTrainer._collect``). No ZeRO-3 engine exists yet while the projector is built, so its own
    forward hooks cannot do this.
    """
    modules = [m for m in model.modules() if any(is_zero3_param(p) for p in m.parameters(recurse=False))]
    if not modules:
        yield
        return
    import deepspeed

    open_contexts: dict[int, list] = {}

    def gather(module: nn.Module, args: tuple) -> None:
        params = [p for p in module.parameters(recurse=False) if is_zero3_param(p)]
        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        context.__enter__()
        open_contexts.setdefault(id(module), []).append(context)

    def release(module: nn.Module, args: tuple, output) -> None:
        open_contexts[id(module)].pop().__exit__(None, None, None)

    handles = [m.register_forward_pre_hook(gather) for m in modules]
    handles += [m.register_forward_hook(release) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for contexts in open_contexts.values():  # a forward that raised midway
            while contexts:
                contexts.pop().__exit__(None, None, None)


def snapshot_on_owner(param: nn.Parameter, owner: int) -> torch.Tensor | None:
    """A clone of the full parameter (its own dtype) on ``owner``, None on other ranks."""
    rank, _ = rank_and_world()
    with gathered([param]):
        return param.detach().clone() if rank == owner else None


class ParameterAccess:
    """Single process and DDP: every rank holds the full weight, which is also what the optimizer updates."""

    def gather(self, param: nn.Parameter, owner: int) -> torch.Tensor | None:
        """The full weight in float32 on ``owner`` (None elsewhere)."""
        rank, _ = rank_and_world()
        return param.detach().float() if rank == owner else None

    def scatter(self, param: nn.Parameter, owner: int, value: torch.Tensor | None) -> None:
        """Set the weight to ``value`` (float32, full shape, given on ``owner``) on every rank."""
        value = broadcast_tensor(value, owner, param.shape, torch.float32, param.device)
        param.data.copy_(value.to(param.dtype))


class Zero12Access(ParameterAccess):
    """DeepSpeed ZeRO-1/2: full module parameter on every rank, fp32 master partitioned (DeepSpeed's full API)."""

    def gather(self, param: nn.Parameter, owner: int) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)  # all-reduce of the fragments: every rank must call it
        if full is None:  # ZeRO-0 in fp32 keeps no separate master
            return super().gather(param, owner)
        rank, _ = rank_and_world()
        return full.view(param.shape) if rank == owner else None

    def scatter(self, param: nn.Parameter, owner: int, value: torch.Tensor | None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        value = broadcast_tensor(value, owner, param.shape, torch.float32, param.device)
        safe_set_full_fp32_param(param, value)  # each rank keeps its own fragment of the master
        param.data.copy_(value.to(param.dtype))


class Zero3Access(ParameterAccess):
    """DeepSpeed ZeRO-3: gather the fp32 master partitions to the owner, scatter the new ones back.

    Communication per weight of ``numel`` elements: one gather and one scatter of ``numel`` fp32
    values through the owner; no rank but the owner ever holds the full weight.
    """

    def gather(self, param: nn.Parameter, owner: int) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_local_fp32_param

        if getattr(param, "ds_secondary_tensor", None) is not None:
            raise NotImplementedError("zero_hpz_partition_size: NSPO needs 1 (hierarchical ZeRO++ partitions).")
        local = safe_get_local_fp32_param(param).reshape(-1)
        rank, world = rank_and_world()
        if world == 1:
            return local[: param.ds_numel].view(param.ds_shape).clone()
        parts = [torch.empty_like(local) for _ in range(world)] if rank == owner else None
        dist.gather(local, parts, dst=owner)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape) if rank == owner else None

    def scatter(self, param: nn.Parameter, owner: int, value: torch.Tensor | None) -> None:
        from deepspeed.utils import safe_set_local_fp32_param

        rank, world = rank_and_world()
        part = param.ds_tensor.numel()  # the fp32 master partition has the same (padded) size
        device = collective_device() if world > 1 else param.ds_tensor.device
        parts = None
        if rank == owner:
            flat = torch.zeros(part * world, dtype=torch.float32, device=device)
            flat[: param.ds_numel] = value.reshape(-1).to(device)
            parts = list(flat.split(part))
        if world == 1:
            local = parts[0]
        else:
            local = torch.empty(part, dtype=torch.float32, device=device)
            dist.scatter(local, parts, src=owner)
        safe_set_local_fp32_param(param, local)
        param.ds_tensor.data.copy_(local.view_as(param.ds_tensor).to(param.ds_tensor.dtype))
        if param.data.numel() == param.ds_numel:
            # a full copy is materialised on every rank: a persistent parameter (ds_numel below
            # stage3_param_persistence_threshold, e.g. LoRA matrices) or one gathered right now
            full = broadcast_tensor(value, owner, param.ds_shape, torch.float32, device)
            param.data.copy_(full.view_as(param.data).to(param.dtype))


def parameter_access(zero_stage: int | None) -> ParameterAccess:
    """The access for a launch: ``zero_stage`` None (no DeepSpeed), 0–2 or 3."""
    if zero_stage is None:
        return ParameterAccess()
    if zero_stage == 3:
        return Zero3Access()
    return Zero12Access()
