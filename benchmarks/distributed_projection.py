"""Per-rank NSPO state and time of one projection step, single process vs DDP / ZeRO-2 / ZeRO-3.

The MLP linears of a Qwen2-shaped model (random weights, random orthonormal bases at null fraction
``k/n``, as in ``projection_step.py``) are wrapped the way each backend holds them, one optimizer step
moves the weights, and then ``ConstrainedUpdate.project_()`` is timed: owners gather ``W``, project,
and write the fp32 master and the module weights back (``nspo_trl/nullspace/access.py``).

    python benchmarks/distributed_projection.py                                  # one process
    torchrun --nproc_per_node 2 benchmarks/distributed_projection.py --backend ddp
    torchrun --nproc_per_node 2 benchmarks/distributed_projection.py --backend zero3

Rank 0 prints the median ms per projection and the largest per-rank ``W_ref`` and projector bytes,
and their ratio to what one process holds (the reference code holds that on every rank, plus dense P).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from projection_step import PRESETS, build, timed
from results_table import command, device_name, record
from torch import nn

from nspo_trl.nullspace.access import parameter_access
from nspo_trl.nullspace.sharding import all_gather_objects, assign_owners, group_costs, rank_and_world
from nspo_trl.nullspace.update import ConstrainedUpdate

STAGES = {"single": None, "ddp": None, "zero2": 2, "zero3": 3}


def wrap(module: nn.Module, backend: str):
    """Hold ``module`` the backend's way; return a function doing one optimizer step on random inputs."""
    inputs = {id(layer): layer.in_features for layer in module}

    def loss_of(model: nn.Module) -> torch.Tensor:
        return sum(layer(torch.randn(4, inputs[id(layer)])).pow(2).mean() for layer in model)

    if STAGES[backend] is None:
        model = nn.parallel.DistributedDataParallel(module) if backend == "ddp" else module
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad()
            loss_of(model.module if backend == "ddp" else model).backward()
            optimizer.step()

        return step
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": STAGES[backend], "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)

    def step():
        engine.backward(loss_of(engine.module))
        engine.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(STAGES), default="single")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--layers", type=int, help="use this many decoder layers instead of the preset's")
    parser.add_argument("--null-fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if STAGES[args.backend] is None:
            dist.init_process_group("gloo")
        else:
            import deepspeed

            deepspeed.init_distributed("gloo")
    rank, world = rank_and_world()
    hidden, intermediate, num_layers = PRESETS[args.preset]
    layers, projector = build(hidden, intermediate, args.layers or num_layers, args.null_fraction, torch.device("cpu"))
    shapes = ((projector.groups[layer.name], *layer.linear.weight.shape) for layer in layers)
    projector.owners = assign_owners(group_costs(shapes, 4), world)
    projector.factors = {
        g: f if projector.owners[g] == rank else f.without_basis() for g, f in projector.factors.items()
    }
    total_w = sum(layer.linear.weight.numel() * 4 for layer in layers)  # before ZeRO-3 partitions them
    total_p = sum(f.in_features * f.stored_dim * 4 for f in projector.factors.values())
    step = wrap(nn.ModuleList([layer.linear for layer in layers]), args.backend)
    update = ConstrainedUpdate(layers, projector, parameter_access(STAGES[args.backend]))
    step()
    seconds = timed(update.project_, args.repeats, torch.device("cpu"))
    held = {
        "w_ref": sum(t.numel() * t.element_size() for t in update.reference.values()),
        "projector": sum(f.basis.numel() * 4 for f in projector.factors.values() if f.basis is not None),
        "seconds": seconds,
    }
    everyone = all_gather_objects(held)
    if rank == 0:
        w_ref, proj = max(h["w_ref"] for h in everyone), max(h["projector"] for h in everyone)
        ms = 1e3 * max(h["seconds"] for h in everyone)
        print(
            f"{args.backend} x{world} ({args.preset}, {len(layers)} MLP linears): projection {ms:.1f} ms/step | "
            f"per rank W_ref {w_ref / 2**20:.1f} MiB + projector {proj / 2**20:.1f} MiB | "
            f"share of one process's state: {(w_ref + proj) / (total_w + total_p):.2f}"
        )
        row = {
            "command": command(),
            "processes": f"{world} × {device_name().removeprefix('CPU, ')}",
            "projection ms/step": f"{ms:.1f}",
            "W_ref per rank": f"{w_ref / 2**20:.1f} MiB",
            "projector per rank": f"{proj / 2**20:.1f} MiB",
            "share of one process's state": f"{(w_ref + proj) / (total_w + total_p):.2f}",
        }
        print(f"recorded in {record('distributed_projection', row, key=('command',))}")


if __name__ == "__main__":
    main()
