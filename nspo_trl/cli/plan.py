"""``nspo-trl plan RECIPE`` (``python -m nspo_trl.planning RECIPE``): a recipe's per-GPU memory, phase by phase."""

from __future__ import annotations

from nspo_trl.cli.arguments import parse
from nspo_trl.planning.plan import print_plan


def main(argv: list[str] | None = None, prog: str = "python -m nspo_trl.planning") -> int:
    """The per-GPU memory plan of a recipe, phase by phase; with ``--gpu-memory GiB``, FITS or DOES NOT FIT."""
    import argparse
    import sys

    from nspo_trl.utils import free_master_port, quiet_command_line

    quiet_command_line()
    free_master_port()
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("recipe", help="a recipe: a shipped name (qwen7b) or a YAML path")
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument("--backend", choices=("zero3", "zero2", "ddp"), default="zero3")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        help="GiB per GPU (nvidia-smi's MiB / 1024; an H100 80GB: 79.6): total every phase against it",
    )
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error("--num-processes: must be at least 1.")
    try:
        script_args, training_args, model_args = parse([args.recipe, "--dry-run"])  # checks only, loads nothing
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    fits = print_plan(script_args, training_args, model_args, args.num_processes, args.backend, args.gpu_memory)
    return 0 if fits else 3
