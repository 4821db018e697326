"""Recipes: every shipped one passes --dry-run; malformed ones stop with one line, exit 2, nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nspo_trl import utils
from nspo_trl.cli.train import cli

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_passes_dry_run(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli([str(recipe), "--dry-run", "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "plan for" in out and "per process, nspo_trl" in out
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_dry_run_figures_for_the_paper_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cli([str(REPO / "recipes" / "qwen7b.yaml"), "--dry-run", "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    # 28 layers x (gate, up, down) of 3584 x 18944; gate/up share an input: 56 groups
    assert "84 protected linears (5.703 B params) in 56 input groups" in out
    assert "dense P    40.11 GiB" in out  # the reference code's dense fp32 P per linear


def smoke_with(tmp_path, **changes) -> str:
    recipe = yaml.safe_load((REPO / "recipes" / "smoke.yaml").read_text())
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write(tmp_path, text) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


MALFORMED = {
    "unknown key": (lambda t: [smoke_with(t, max_stepz=3)], "max_stepz"),
    "string for int": (lambda t: [smoke_with(t, max_steps="abc")], "max_steps"),
    "list for float": (lambda t: [smoke_with(t, nspo_alpha=[1])], "nspo_alpha"),
    "string for bool": (lambda t: [smoke_with(t, use_cpu="yes")], "use_cpu"),
    "invalid yaml": (lambda t: [write(t, "max_steps: [1,\n")], "recipe"),
    "not a mapping": (lambda t: [write(t, "- max_steps\n- 3\n")], "recipe"),
    "override type": (lambda t: [smoke_with(t), "--max_steps", "abc"], "max_steps"),
    "unknown override": (lambda t: [smoke_with(t), "--nspo_alfa", "1e-4"], "nspo_alfa"),
    "alpha range": (lambda t: [smoke_with(t), "--nspo_alpha", "1.5"], "nspo_alpha"),
    "missing data file": (lambda t: [smoke_with(t, dataset_name="./no/such/prompts.jsonl")], "dataset_name"),
    "missing model dir": (
        lambda t: [smoke_with(t, model_name_or_path="./no-model", build_tiny_model=False)],
        "model_name_or_path",
    ),
    "fraction range": (lambda t: [smoke_with(t), "--train_fraction", "1.5"], "train_fraction"),
    "judge mode": (lambda t: [smoke_with(t), "--judge_mode", "vote"], "judge_mode"),
    "unknown reward": (lambda t: [smoke_with(t, reward_funcs=["nope"])], "reward_funcs"),
    "missing recipe": (lambda t: [str(t / "absent.yaml")], "recipe"),
    "duplicate key": (lambda t: [write(t, "max_steps: 2\nnspo_alpha: 1.0e-4\nmax_steps: 3\n")], "max_steps"),
    "not utf-8": (lambda t: [write_bytes(t, b"max_steps: 2\n# caf\xe9\n")], "UTF-8"),
    "infinite alpha": (lambda t: [write(t, "nspo_alpha: .inf\n")], "nspo_alpha"),
    "nan learning rate": (lambda t: [write(t, "learning_rate: .nan\n")], "learning_rate"),
    "mapping for list": (lambda t: [smoke_with(t, nspo_target_modules={"mlp": 1})], "nspo_target_modules"),
    "empty target regex": (lambda t: [smoke_with(t, nspo_target_modules=[""])], "nspo_target_modules"),
    "zero batch size": (lambda t: [smoke_with(t, per_device_train_batch_size=0)], "per_device_train_batch_size"),
    "zero accumulation": (lambda t: [smoke_with(t, gradient_accumulation_steps=0)], "gradient_accumulation_steps"),
    "zero generations": (lambda t: [smoke_with(t, num_generations=0)], "num_generations"),
    "negative learning rate": (lambda t: [smoke_with(t, learning_rate=-1.0e-4)], "learning_rate"),
    "projector path is a file": (lambda t: [smoke_with(t, nspo_projector_path=file_in(t))], "nspo_projector_path"),
}


def write_bytes(tmp_path, data: bytes) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    return str(path)


def file_in(tmp_path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a projector")
    return str(path)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_is_one_line_exit_2_nothing_written(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    make_args, field = MALFORMED[case]
    out = tmp_path / "out"
    assert cli([*make_args(tmp_path), "--output_dir", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("nspo_trl.train: error:") and field in lines[-1], lines[-3:]
    assert not out.exists()


def test_unsupported_library_version_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    real = utils.installed
    monkeypatch.setattr(utils, "installed", lambda name: "1.15.0" if name == "trl" else real(name))
    assert cli([smoke_with(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "trl 1.15.0 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plan_for_qwen7b_on_eight_ranks(capsys):
    """Per-rank projector + W_ref <= 6.05 GiB (6.5 GB) under ZeRO-3 on 8 ranks (reference ≈ 61 GiB)."""
    from nspo_trl.cli.plan import main as plan

    assert plan([str(REPO / "recipes" / "qwen7b.yaml"), "--num-processes", "8"]) == 0
    out = capsys.readouterr().out
    ours = float(re.search(r"nspo_trl : .* = +([\d.]+) GiB", out).group(1))
    reference = float(re.search(r"reference: .* = +([\d.]+) GiB", out).group(1))
    assert ours <= 6.05
    assert reference == pytest.approx(61.36, abs=0.01)  # dense fp32 P (40.11) + fp32 W_ref (21.25)
    assert "on 8 processes (zero3)" in out and "extra communication per projection step" in out


def test_plan_rejects_a_bad_rank_count(capsys):
    from nspo_trl.cli.plan import main as plan

    with pytest.raises(SystemExit) as exit_info:
        plan([str(REPO / "recipes" / "qwen7b.yaml"), "--num-processes", "0"])
    assert exit_info.value.code == 2
    assert "--num-processes" in capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "processes"), [("qwen7b", 8), ("qwen7b_full_preservation", 8), ("qwen7b_lora", 1)])
def test_7b_recipes_have_the_papers_batch_on_their_stated_launch(recipe, processes, monkeypatch):
    """The paper: 320 prompts x 5 completions per generation, two optimizer steps of 800 completions."""
    from nspo_trl.cli.arguments import parse
    from nspo_trl.cli.train import describe_batch, effective_batch

    monkeypatch.chdir(REPO)
    script_args, training_args, _ = parse([f"recipes/{recipe}.yaml", "--dry-run"])
    assert script_args.recipe_num_processes == processes
    batch = effective_batch(training_args, processes)
    assert batch["completions_per_step"] == 800 and batch["completions_per_generation"] == 1600
    assert batch["prompts_per_generation"] == 320 and batch["steps_per_generation"] == 2
    assert len(describe_batch(script_args, training_args, processes)) == 1  # no warning on the stated launch
    other = describe_batch(script_args, training_args, processes * 2)
    assert len(other) == 2 and other[1].startswith("warning: recipe_num_processes")
    assert "800 completions per optimizer step become 1600" in other[1]


def test_dry_run_shows_every_deciding_setting_even_at_its_default(tmp_path, monkeypatch, capsys):
    """lr, batch and α are printed whether or not the recipe sets them; the batch is the launch's."""
    import nspo_trl.cli.train

    monkeypatch.chdir(REPO)
    recipe = yaml.safe_load((REPO / "recipes" / "smoke.yaml").read_text())
    for name in ("learning_rate", "nspo_alpha", "nspo_project_every", "beta"):
        recipe.pop(name, None)  # left at NSPOConfig's defaults
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(nspo_trl.cli.train, "launch_shape", lambda: (4, "zero3"))  # as under accelerate launch
    assert cli([str(path), "--dry-run", "--gradient_accumulation_steps", "3"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.split("\n\n")[0].splitlines()}
    per_device = recipe["per_device_train_batch_size"]
    assert (
        f"{per_device * 3 * 4} completions per optimizer step = {per_device} per device x 3 accumulation x 4"
        in (lines["global batch"])
    )
    assert lines["learning rate"].split()[2] == "1e-06"  # NSPOConfig's default, not omitted
    assert "alpha 5e-05" in lines["null space"] and "every 1 step(s)" in lines["projection"]
    assert lines["KL beta"].endswith(" 0") and recipe["model_name_or_path"] in lines["model"]
    assert out.count("global batch") == 1


def test_dry_run_prints_once_per_launch(tmp_path):
    """A real 2-process launch through ``nspo-trl train --accelerate_config`` (the shipped DDP config on
    CPU): every rank checks the recipe, only rank 0 prints it, with the launch's 2 processes."""
    config = yaml.safe_load((REPO / "accelerate_configs" / "ddp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no", main_process_port=29581)
    config.pop("gpu_ids", None)  # MULTI_GPU + use_cpu: torchrun with gloo
    (tmp_path / "cpu_ddp.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "nspo-trl"), "train", "recipes/smoke.yaml", "--dry-run",
               "--accelerate_config", str(tmp_path / "cpu_ddp.yaml")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("global batch") == 1 and result.stdout.count("plan for") == 1
    assert "x 2 process(es)" in result.stdout


def test_reward_description_names_the_judge_only_for_a_judge(monkeypatch):
    """The card and --dry-run describe rewards the same way: the judge model appears only with a judge."""
    from nspo_trl.cli.arguments import parse
    from nspo_trl.cli.train import card_details, describe_reward

    monkeypatch.chdir(REPO)
    qwen = parse(["recipes/qwen7b.yaml", "--dry-run"])
    assert describe_reward(qwen[0]) == "llama_guard (judge meta-llama/Llama-Guard-3-8B)"
    assert card_details(qwen[0], qwen[2], 10, 5)["reward"] == "`llama_guard` (judge `meta-llama/Llama-Guard-3-8B`)"
    smoke = parse(["recipes/smoke.yaml", "--dry-run"])
    assert describe_reward(smoke[0]) == "refusal"
