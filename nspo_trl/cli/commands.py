"""The ``nspo-trl`` command: one entry point for training, planning, evaluation and the shipped files.

    nspo-trl train                                  # the CPU smoke recipe
    nspo-trl train qwen7b --dry-run                 # a shipped recipe by name (or any path), checked only
    nspo-trl train qwen7b --accelerate_config zero3 # launched through accelerate with a shipped config
    nspo-trl plan qwen7b --num-processes 8 --gpu-memory 80
    nspo-trl eval --model outputs/smoke --suites safety,drift
    nspo-trl judge answers.jsonl                    # unsafe / refused per (prompt, response) line
    nspo-trl projector build smollm2_cpu --output P # the recipe's projector, without training
    nspo-trl recipes                                # what ships: recipes and accelerate configs

``train`` is also ``python -m nspo_trl.train`` and ``plan`` ``python -m nspo_trl.planning``. Like TRL's
``trl grpo --accelerate_config``, ``train`` with ``--accelerate_config NAME|PATH`` (and optionally
``--num_processes N``) re-runs itself under ``accelerate launch``; every other option goes to the trainer.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable

PROG = "nspo-trl"
LAUNCH_OPTIONS = ("--accelerate_config", "--num_processes", "--main_process_port")


def split_launch_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``({option: value}, rest)``: the accelerate options of ``LAUNCH_OPTIONS`` taken out of ``argv``."""
    launch: dict[str, str] = {}
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        name, equals, value = item.partition("=")
        if name in LAUNCH_OPTIONS:
            value = value if equals else next(items, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{name}: needs a value.")
            launch[name] = value
        else:
            rest.append(item)
    return launch, rest


def train(argv: list[str]) -> int:
    from nspo_trl.cli.train import cli, fail

    try:
        launch, rest = split_launch_options(argv)
    except ValueError as err:
        fail(f"error: {err}")
        return 2
    if "--accelerate_config" not in launch:
        if "--num_processes" in launch:
            fail("error: --num_processes: only with --accelerate_config (the launch it changes).")
            return 2
        return cli(rest, prog=f"{PROG} train")
    return accelerate_launch(launch, rest)


def accelerate_launch(launch: dict[str, str], train_argv: list[str]) -> int:
    """``accelerate launch --config_file CONFIG [--num_processes N] -m nspo_trl.train ARGV`` in this process."""
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    from nspo_trl.cli.packaged import accelerate_config_path
    from nspo_trl.cli.train import fail

    try:
        config = accelerate_config_path(launch["--accelerate_config"])
    except ValueError as err:
        fail(f"error: {err}")
        return 2
    options = ["--config_file", str(config)]
    for name in ("--num_processes", "--main_process_port"):
        if name in launch:
            options += [name, launch[name]]
    args = launch_command_parser().parse_args([*options, "--module", "nspo_trl.train", *train_argv])
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # the ranks printed their own errors
        return err.returncode or 1
    return 0


def plan(argv: list[str]) -> int:
    from nspo_trl.cli.plan import main

    return main(argv, prog=f"{PROG} plan")


def evaluate(argv: list[str]) -> int:
    from nspo_trl.cli.eval import cli

    return cli(argv, prog=f"{PROG} eval")


def judge(argv: list[str]) -> int:
    from nspo_trl.cli.judge import main

    return main(argv, prog=f"{PROG} judge")


def projector(argv: list[str]) -> int:
    from nspo_trl.cli.projector import main

    return main(argv, prog=f"{PROG} projector")


def recipes(argv: list[str]) -> int:
    """Print the shipped recipes and accelerate configs, each with the first line of its header."""
    from rich.console import Console
    from rich.table import Table

    from nspo_trl.cli.packaged import headline, shipped_accelerate_configs, shipped_recipes

    if argv:
        print(f"{PROG} recipes: takes no arguments (got {argv[0]!r}).", file=sys.stderr)
        return 2
    console = Console()
    for title, files, usage in (
        ("recipes", shipped_recipes(), f"{PROG} train NAME"),
        ("accelerate configs", shipped_accelerate_configs(), f"{PROG} train RECIPE --accelerate_config NAME"),
    ):
        table = Table(title=f"{title} ({usage})", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("what it is", overflow="fold")
        for name, path in files.items():
            table.add_row(name, headline(path))
        console.print(table)
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (train, "train with NSPO from a recipe (a shipped name or a path); --dry-run checks only"),
    "plan": (plan, "the per-GPU memory plan of a recipe, phase by phase"),
    "eval": (evaluate, "safety, capability and drift of a trained model against its reference"),
    "judge": (judge, "judge (prompt, response) pairs of a JSON-lines file: unsafe and refused, one line each"),
    "projector": (projector, "build a recipe's projector without training (build), or share one (push)"),
    "recipes": (recipes, "list the shipped recipes and accelerate configs"),
}


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"'{PROG} COMMAND --help' shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"{PROG} {version('nspo_trl')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        print(f"{PROG}: error: unknown command {command!r};{hint} commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    return COMMANDS[command][0](rest)


if __name__ == "__main__":
    sys.exit(main())
