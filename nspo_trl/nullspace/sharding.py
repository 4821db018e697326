"""Layer ownership: how NSPO's state and work are split across data-parallel ranks.

Every input group ``g`` (layers that read the same input, see ``collect.py``) has one *owner*
rank. Only the owner keeps the group's projector basis ``(n, min(k, n − k))`` and the reference
weights ``W_ref`` of the group's layers, builds the group's eigendecomposition and computes
``W_ref + (W − W_ref) P`` for those layers; the other ranks only send and receive their part of
``W`` (see ``access.py``). With ``N`` ranks each one holds about ``1/N`` of ``W_ref`` and of the
projector, like ZeRO-3 holds ``1/N`` of the weights.

Owners are assigned greedily (largest group first, to the least-loaded rank), with the cost of a
group taken as its worst-case bytes: ``Σ_layers out·n·b_w`` for ``W_ref`` plus ``n·⌊n/2⌋·4`` for
an fp32 basis at null fraction 1/2. The assignment is a pure function of names and shapes, so
every rank computes the same one without communicating, and a run resumed on a different number
of ranks simply reassigns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist


def group_costs(layers: Iterable[tuple[str, int, int]], weight_bytes: int) -> dict[str, int]:
    """Worst-case bytes each group's owner stores, from ``(group, out_features, in_features)`` per layer:
    ``W_ref`` of its layers (``out_features`` 0 for a layer without one, e.g. LoRA) plus an fp32 basis
    of ``n·⌊n/2⌋``."""
    costs: dict[str, int] = {}
    for group, out_features, in_features in layers:
        costs.setdefault(group, in_features * (in_features // 2) * 4)
        costs[group] += out_features * in_features * weight_bytes
    return costs


def assign_owners(costs: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment of groups to ranks (deterministic: ties by name, then rank)."""
    loads = [0] * world_size
    owners: dict[str, int] = {}
    for group in sorted(costs, key=lambda g: (-costs[g], g)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[group] = rank
        loads[rank] += costs[group]
    return owners


def rank_loads(costs: Mapping[str, int], owners: Mapping[str, int], world_size: int) -> list[int]:
    """Bytes each rank holds under ``owners``."""
    loads = [0] * world_size
    for group, rank in owners.items():
        loads[rank] += costs[group]
    return loads


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable, small), in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_agreement(value: object, what: str, gather: Callable[[object], list[object]] | None = None) -> None:
    """Raise at once (instead of a collective hanging until its timeout) unless every rank holds ``value``.

    Ownership is computed by every rank on its own; ranks that disagree (another model revision or
    target list on one node, say) would wait for each other in mismatched collectives for good.
    """
    values = (gather or all_gather_objects)(value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        raise RuntimeError(
            f"NSPO: {what} differ between ranks (rank 0 vs ranks {differing}); every rank must load the same "
            "model, nspo_target_modules and preservation data."
        )


def broadcast_tensor(
    tensor: torch.Tensor | None, src: int, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (``tensor`` is ignored elsewhere and may be None)."""
    if not is_distributed():
        return tensor
    buffer = tensor.contiguous() if dist.get_rank() == src else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buffer, src)
    return buffer


def collective_device() -> torch.device:
    """Where small tensors must live for the default process group's collectives (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()
