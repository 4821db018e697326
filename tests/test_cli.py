"""The ``nspo-trl`` command: subcommands, shipped recipes and configs by name, typos, launching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nspo_trl.cli import commands as cli
from nspo_trl.cli.arguments import parse
from nspo_trl.cli.packaged import (
    ACCELERATE_CONFIGS_DIR,
    RECIPES_DIR,
    accelerate_config_path,
    recipe_path,
    shipped_accelerate_configs,
    shipped_recipes,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_repository_folders_are_the_shipped_ones():
    """``recipes/`` and ``accelerate_configs/`` at the top are the package's folders, not copies that drift."""
    assert (REPO / "recipes").resolve() == RECIPES_DIR and (
        REPO / "accelerate_configs"
    ).resolve() == ACCELERATE_CONFIGS_DIR
    assert {"smoke", "smollm2_cpu", "qwen7b", "qwen7b_lora", "qwen7b_full_preservation"} <= set(shipped_recipes())
    assert {"zero3", "zero2", "ddp"} <= set(shipped_accelerate_configs())


@pytest.mark.parametrize("spelling", ["qwen7b", "qwen7b.yaml"])
def test_recipes_by_name(spelling):
    assert recipe_path(spelling) == RECIPES_DIR / "qwen7b.yaml"
    assert accelerate_config_path(spelling.replace("qwen7b", "zero3")) == ACCELERATE_CONFIGS_DIR / "zero3.yaml"


def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    local = tmp_path / "smoke.yaml"
    local.write_text((RECIPES_DIR / "smoke.yaml").read_text().replace("max_steps: ", "max_steps: 1 #"))
    assert recipe_path(local) == local
    monkeypatch.chdir(tmp_path)
    assert recipe_path("smoke.yaml") == Path("smoke.yaml")  # the file here, not the shipped one
    assert parse(["smoke.yaml", "--dry-run"])[1].max_steps == 1


@pytest.mark.parametrize(
    ("name", "finder", "suggestion"),
    [
        ("qwen7", recipe_path, "qwen7b"),
        ("smolm2_cpu", recipe_path, "smollm2_cpu"),
        ("recipes/smoke.yml", recipe_path, "smoke"),
        ("zero_3", accelerate_config_path, "zero3"),
        ("zer2.yaml", accelerate_config_path, "zero2"),
    ],
)
def test_unknown_names_suggest_the_closest(name, finder, suggestion):
    with pytest.raises(ValueError, match=rf"neither a file nor a shipped name; did you mean '{suggestion}'\?"):
        finder(name)


def test_subcommand_typos_and_usage(capsys):
    assert cli.main(["tran"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert cli.main(["evaluate"]) == 2 and "did you mean 'eval'" in capsys.readouterr().err
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "plan", "eval", "recipes"))


def test_recipes_lists_every_shipped_file(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*shipped_recipes(), *shipped_accelerate_configs()])
    assert cli.main(["recipes", "extra"]) == 2


@pytest.mark.parametrize(("command", "prog"), [("train", "nspo-trl train"), ("plan", "nspo-trl plan"),
                                               ("eval", "nspo-trl eval")])  # fmt: skip
def test_help_names_the_command_it_was_run_as(command, prog, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nspo_alfa", "1e-4"], "--nspo_alfa: unknown option; did you mean --nspo_alpha?"),
        (["--lerning_rate=1e-4"], "--lerning_rate: unknown option; did you mean --learning_rate?"),
        (["--reward_funcs", "refusl"], "did you mean 'refusal'?"),
        (["--reward_funcs", "my_rewards.score"], "write an importable function as 'my_rewards:score'"),
    ],
)
def test_option_typos_suggest_the_closest(argv, message, capsys):
    assert cli.main(["train", "smoke", *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_reward_by_module_colon_attribute(tmp_path, monkeypatch):
    from nspo_trl.utils import import_object

    (tmp_path / "my_rewards.py").write_text("def score(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    assert import_object("my_rewards:score", "reward_funcs")(["a", "b"]) == [0.0, 0.0]
    not_a_spec = "is not 'module:attribute'"
    for bad, message in [("my_rewards:nope", "cannot import"), ("no_module:x", "cannot import"),
                         ("my_rewards:", not_a_spec), (":score", not_a_spec)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"reward_funcs: .*{message}"):
            import_object(bad, "reward_funcs")


def test_accelerate_config_launches_train_under_accelerate(monkeypatch):
    """``--accelerate_config zero3 --num_processes 8`` becomes accelerate's own launch of ``-m nspo_trl.train``."""
    import accelerate.commands.launch as launch

    seen = []
    monkeypatch.setattr(launch, "launch_command", seen.append)
    argv = ["train", "qwen7b", "--accelerate_config", "zero3", "--num_processes=8", "--learning_rate", "1e-6"]
    assert cli.main(argv) == 0
    (args,) = seen
    assert Path(args.config_file) == ACCELERATE_CONFIGS_DIR / "zero3.yaml" and args.num_processes == 8
    assert args.module and args.training_script == "nspo_trl.train"
    assert args.training_script_args == ["qwen7b", "--learning_rate", "1e-6"]

    def failing(args):
        raise subprocess.CalledProcessError(3, "accelerate")

    monkeypatch.setattr(launch, "launch_command", failing)
    assert cli.main(argv) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--accelerate_config", "zero33"], "did you mean 'zero3'?"),
        (["--accelerate_config"], "--accelerate_config: needs a value"),
        (["--num_processes", "2"], "--num_processes: only with --accelerate_config"),
    ],
)
def test_bad_launch_options(argv, message, capsys):
    assert cli.main(["train", "smoke", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_console_script_is_installed():
    """``nspo-trl`` is the entry point of this environment's install (setup.cfg console_scripts)."""
    script = Path(sys.executable).parent / "nspo-trl"
    result = subprocess.run([str(script), "recipes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "qwen7b_lora" in result.stdout
