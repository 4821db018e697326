"""Every code block of the README and of the pages under docs/ is run, so the docs cannot drift from the code.

- Python blocks run as written, at tiny scale: ``NSPOConfig`` gets CPU/one-step overrides, the Hub
  model id maps to the tiny local model, the two Hub data sets to small stand-ins in their schemas,
  and the Llama Guard URL to a local judge server.
- Shell blocks: each command as written; long jobs (a 7B recipe, the 25-minute SmolLM2 run) get
  ``--dry-run``, ``--accelerate_config`` is checked at accelerate's launch call, ``nspo-trl eval`` is
  parsed, the install commands name files and extras that exist, and ``vllm serve`` (an external server)
  is the one command not run.
- Printed outputs are compared with what the code prints now (the plan exactly, the summary line by form).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import datasets
import pytest
import yaml
from guard_server import GuardServer

import nspo_trl
from nspo_trl.cli import commands as cli
from nspo_trl.trainer.hub import NSPO_CITATION

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PAGES = {
    path.relative_to(REPO).as_posix(): path.read_text()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
}
BLOCKS = [block for text in PAGES.values() for block in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)]


def blocks(language: str, containing: str) -> list[str]:
    found = [body for lang, body in BLOCKS if lang == language and containing in body]
    assert found, f"no {language or 'output'} block with {containing!r} in the README"
    return found


def commands(body: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments removed."""
    text = body.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


HANDLED = {
    ("bash", "python3 -m venv .venv && "), ("bash", "pytest -q"), ("", "max leakage"), ("python", "NSPOConfig("),
    ("python", "class MyTrainer"), ("bash", "nspo-trl recipes"), ("bash", "nspo-trl train smollm2_cpu"),
    ("", "plan for Qwen/Qwen2.5-7B-Instruct"), ("bash", "vllm serve"), ("python", "reward = LlamaGuardReward("),
    ("bash", "nspo-trl eval"), ("", "mutants killed"), ("bibtex", "@inproceedings"), ("bash", ".venv-vllm"),
    ("bash", "accelerate launch --config_file"), ("", "held-out harmful refused"), ("bash", "nspo_trl[judge]"),
    ("bash", "nspo-trl projector build"), ("bash", "--dry-run first prints"),
}  # fmt: skip


def test_every_block_is_handled_by_a_test_here():
    """A new README block without a check in this file fails here."""
    for lang, body in BLOCKS:
        assert [key for key in HANDLED if key[0] == lang and key[1] in body], f"unhandled {lang} block:\n{body}"
    assert len(BLOCKS) == len(HANDLED)


def test_setup_commands(tmp_path, capsys):
    """The install names real files and extras; the main job runs (2 steps) and prints the README's line."""
    (install,) = blocks("bash", "python3 -m venv .venv && ")
    steps = [part.strip() for part in install.split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    setup = (REPO / "setup.cfg").read_text()
    for step in steps[1:-1]:
        for constraint in re.findall(r"-c (\S+)", step):
            assert (REPO / constraint).is_file(), constraint
        for extras in re.findall(r'"\.\[([\w,]+)\]"', step):
            assert all(f"\n{extra} =" in setup for extra in extras.split(",")), extras
    assert steps[-1] == ".venv/bin/nspo-trl train"
    (tests,) = blocks("bash", "pytest -q")
    assert tests.strip() in (REPO / ".ci" / "run").read_text()  # the README's test command is what CI runs

    import os

    os.chdir(tmp_path)
    try:
        assert cli.main(["train", "--max_steps", "2", "--output_dir", "out"]) == 0
    finally:
        os.chdir(REPO)
    printed = capsys.readouterr().out.splitlines()
    (example,) = blocks("", "max leakage")
    shown = [line for line in example.splitlines() if line.strip() != "…"]
    assert any(line.startswith("steps 80 in") for line in shown)
    for line in shown:  # each line the README shows is printed, in that order, up to its figures
        parts = re.split(r"(-?\d[\d.]*(?:e[-+]\d+)?)", line)  # text, figure, text, …
        form = "".join(re.escape(p) if k % 2 == 0 else r"-?[\d.]+(?:e[-+]\d+)?" for k, p in enumerate(parts))
        matches = [i for i, out in enumerate(printed) if re.fullmatch(form, out)]
        assert matches, (line, printed[-40:])
        printed = printed[matches[0] + 1 :]


def hub_stand_in(name: str, split: str = "train", **kwargs) -> datasets.Dataset:
    """Small data sets in the schemas of the two Hub sets the README's example loads."""
    if name == "PKU-Alignment/PKU-SafeRLHF":
        rows = nspo_trl.data.named_sets.load_named_dataset("nspo_trl:safety_prompts")
        texts = [p[0]["content"] for p in rows["prompt"]]
        return datasets.Dataset.from_dict({"prompt": texts, "is_response_0_safe": [not h for h in rows["is_harmful"]],
                                           "is_response_1_safe": [True] * len(texts)})  # fmt: skip
    if name == "tatsu-lab/alpaca":
        columns = {"instruction": ["Add 2 and 3.", "Name a colour.", "Say hi."], "input": ["", "", "in French"],
                   "output": ["5", "Blue", "Salut"]}  # fmt: skip
        return datasets.Dataset.from_dict({name: values * 4 for name, values in columns.items()})
    raise AssertionError(f"the README loads {name!r}: give it a stand-in here")


@pytest.fixture
def tiny_scale(tiny_model_dir, tmp_path, monkeypatch):
    """The README's Python as written, on the tiny model, one step on the CPU, a local judge."""
    real_config, real_trainer = nspo_trl.NSPOConfig, nspo_trl.NSPOTrainer

    def config(**fields):
        fields.update(output_dir=str(tmp_path / fields["output_dir"]), max_steps=1, use_cpu=True, report_to="none",
                      per_device_train_batch_size=fields.get("num_generations", 2), max_completion_length=6,
                      nspo_preservation_max_length=32, save_strategy="no")  # fmt: skip
        return real_config(**fields)

    class Trainer(real_trainer):
        def __init__(self, model, *args, **kwargs):
            assert model == "Qwen/Qwen2.5-7B-Instruct"
            super().__init__(tiny_model_dir, *args, **kwargs)

    monkeypatch.setattr(nspo_trl, "NSPOConfig", config)
    monkeypatch.setattr(nspo_trl, "NSPOTrainer", Trainer)
    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    with GuardServer() as server:
        yield server


def run_python(body: str, namespace: dict, server) -> dict:
    exec(compile(body.replace("http://127.0.0.1:8000/v1", server.base_url), "README.md", "exec"), namespace)
    return namespace


def test_python_example_and_subclass(tiny_scale, capsys):
    (example,) = blocks("python", "NSPOConfig(")
    namespace = run_python(example, {}, tiny_scale)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1 and trainer.args.nspo_alpha == 5e-5
    assert "'null_dim'" in capsys.readouterr().out  # the printed projector statistics
    (subclass,) = blocks("python", "class MyTrainer")
    run_python(subclass, namespace, tiny_scale)
    mine = namespace["MyTrainer"](
        "Qwen/Qwen2.5-7B-Instruct", reward_funcs=trainer.reward_funcs, args=trainer.args,
        train_dataset=trainer.train_dataset, preservation_dataset=namespace["preservation_pairs"](
            namespace["alpaca"], "instruction", "output", "input"),
    )  # fmt: skip
    mine.train()
    assert mine.projector.stats() == trainer.projector.stats()


def test_judge_example(tiny_scale):
    (example,) = blocks("python", "reward = LlamaGuardReward(")
    reward = run_python(example, {}, tiny_scale)["reward"]
    assert reward.model == "meta-llama/Llama-Guard-3-8B"


def test_shell_commands(monkeypatch, capsys):
    """Each ``nspo-trl`` command of the README, in this process (long jobs as --dry-run)."""
    import accelerate.commands.launch as launch

    launched = []
    monkeypatch.setattr(launch, "launch_command", launched.append)
    monkeypatch.chdir(REPO)
    lines = [c for key in ("nspo-trl recipes", "nspo-trl train smollm2_cpu", "nspo-trl train qwen7b --reward")
             for body in blocks("bash", key) for c in commands(body)]  # fmt: skip
    ran = 0
    for argv in lines:
        if argv[0] == "vllm":
            continue  # the judge server: external, started by the user
        assert Path(argv[0]).name == "nspo-trl", argv
        args = argv[1:]
        if args[0] == "train" and "--dry-run" not in args and "--accelerate_config" not in args:
            args.append("--dry-run")
        assert cli.main(args) == 0, (argv, capsys.readouterr().err[-500:])
        ran += 1
    assert ran >= 8 and len(launched) == 1 and launched[0].training_script_args == ["qwen7b"]


def test_real_model_output_is_what_the_summary_prints():
    """The README's SmolLM2 lines are the summary's own held-out lines for those figures."""
    from nspo_trl.cli.train import summary_lines

    (shown,) = blocks("", "held-out harmful refused")
    figures = [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", shown)]
    held = dict(zip(
        ["heldout_refusal_before", "heldout_refusal_after", "heldout_declined_before", "heldout_declined_after",
         "general_kl_mean", "learned_unsafe_before", "learned_unsafe_after", "learned_overrefusal_before",
         "learned_overrefusal_after", "capability_before", "capability_after"],
        figures, strict=True,
    ))  # fmt: skip
    summary = {"steps": 24, "wall_time_s": 1.0, "reward_first": -0.5, "reward_last": -0.3,
               "leakage": {"fit": 3e-3}, "projector_layers": {}, "heldout": held}  # fmt: skip
    printed = summary_lines(summary)
    lines = shown.splitlines()
    start = printed.index(lines[0])
    assert printed[start : start + len(lines)] == lines


def test_eval_command_parses():
    from nspo_trl.cli.arguments import RecipeParser
    from nspo_trl.cli.eval import EvalArguments

    (body,) = blocks("bash", "nspo-trl eval")
    (argv,) = commands(body)
    assert argv[:2] == ["nspo-trl", "eval"]
    (args,) = RecipeParser([EvalArguments]).parse_args_and_config(args=argv[2:])
    assert args.model == "out/qwen7b-nspo" and args.judge == "llama_guard"


def test_plan_output_is_what_plan_prints(capsys):
    (printed,) = blocks("", "plan for Qwen/Qwen2.5-7B-Instruct")
    (page,) = [text for text in PAGES.values() if printed in text]
    command = re.search(r"`(nspo-trl plan [^`]+)`", page).group(1)
    assert cli.main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.strip() == printed.strip()


def test_mutation_output_names_the_current_mutants():
    from mutation_check import MUTANTS

    (printed,) = blocks("", "mutants killed")
    names = [line.split("s  ", 1)[1] for line in printed.splitlines() if line.startswith(("KILLED", "SURVIVED"))]
    assert names == [m.name for m in MUTANTS]
    assert f"{len(MUTANTS)} of {len(MUTANTS)} mutants killed" in printed


def test_vllm_install_is_the_one_ci_runs():
    """The README's vLLM venv command is .ci/run's, step for step (CI runs it and the tests in it)."""
    (body,) = blocks("bash", ".venv-vllm")
    ci = " ".join((REPO / ".ci" / "run").read_text().replace("\\\n", " ").split())
    for step in body.strip().split(" && "):
        words = [w for w in step.split() if w not in ("-q", "-y")]
        assert all(w.strip('"') in ci for w in words), step


def test_citation_is_the_one_the_model_card_uses():
    (bibtex,) = blocks("bibtex", "@inproceedings")
    assert bibtex.split() == NSPO_CITATION.split()


def test_recipe_table_lists_every_shipped_recipe():
    from nspo_trl.cli.packaged import shipped_recipes

    assert all(f"| `{name}` |" in README for name in shipped_recipes())
    assert yaml.safe_load("a: 1") == {"a": 1}


def test_the_papers_launch_is_the_shipped_config_and_recipe(monkeypatch, capsys):
    """``accelerate launch --config_file … -m nspo_trl.train RECIPE``: both files ship, and the recipe checks."""
    (body,) = blocks("bash", "accelerate launch --config_file")
    (argv,) = commands(body)
    assert argv[:3] == ["accelerate", "launch", "--config_file"] and argv[4:6] == ["-m", "nspo_trl.train"]
    assert (REPO / argv[3]).is_file() and (REPO / argv[6]).is_file()
    monkeypatch.chdir(REPO)
    from nspo_trl.cli.train import cli as train_cli

    assert train_cli([argv[6], "--dry-run"]) == 0
    assert "Qwen/Qwen2.5-7B-Instruct" in capsys.readouterr().out


def test_judge_page_commands(tmp_path, capsys):
    """The judge page's install names a real extra, and its command judges a file of the documented form."""
    import json

    (body,) = blocks("bash", "nspo_trl[judge]")
    install, judge = commands(body)
    assert install[:2] == ["pip", "install"] and "\njudge =" in (REPO / "setup.cfg").read_text()
    pytest.importorskip("sentence_transformers")
    answers = tmp_path / judge[2]
    answers.write_text(
        json.dumps({"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof."}) + "\n"
    )
    assert cli.main([*judge[1:2], str(answers)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["unsafe"] is False and isinstance(row["refused"], bool)


def test_every_nspo_setting_is_in_the_settings_table():
    import dataclasses
    import typing

    from nspo_trl.trainer.nspo_config import NSPOConfig

    table = PAGES["docs/recipes.md"].split("<!-- settings -->", 1)[1].split("<!-- /settings -->", 1)[0]
    hints = typing.get_type_hints(NSPOConfig)
    for field in dataclasses.fields(NSPOConfig):
        if field.name.startswith("nspo_"):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kind = str(hints[field.name]).replace("<class '", "").replace("'>", "").replace("typing.", "")
            kind = kind.replace(" | ", " \\| ")  # escaped inside a Markdown cell
            assert f"| `{field.name}` | `{kind}` | `{default!r}` |" in table, field.name


def test_benchmark_tables_match_their_result_files():
    """A table embedded as ``<!-- results/X.md -->…<!-- /results/X.md -->`` is that file, byte for byte."""
    marker = r"<!-- ((?:benchmarks/)?results/[\w/.-]+\.md) -->\n(.*?)<!-- /\1 -->"
    for page in (REPO / "benchmarks" / "README.md", REPO / "README.md"):
        text = page.read_text()
        embedded = re.findall(marker, text, flags=re.S)
        assert embedded, page
        for name, table in embedded:
            assert table == (page.parent / name).read_text(), (page, name)
    # and no table of benchmarks/README.md is written by hand: outside the markers there is none
    outside = re.sub(marker, "", (REPO / "benchmarks" / "README.md").read_text(), flags=re.S)
    assert not re.findall(r"^\|---", outside, flags=re.M)


def test_projector_commands(tmp_path, monkeypatch, capsys):
    """docs/recipes.md's build, push and reuse, in order, with a local stand-in for the Hub."""
    from testing_utils import LocalHub

    import nspo_trl.cli.projector as projector_cli
    from nspo_trl import NSPOTrainer

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(projector_cli, "hub_api", lambda: hub)
    monkeypatch.setattr(NSPOTrainer, "hub_api", lambda self, token=None: hub)
    monkeypatch.chdir(tmp_path)
    (body,) = blocks("bash", "nspo-trl projector build")
    lines = commands(body)
    assert [argv[:3] for argv in lines] == [["nspo-trl", "projector", "build"], ["nspo-trl", "projector", "push"],
                                            ["nspo-trl", "train", "smoke"]]  # fmt: skip
    for argv in lines:
        extra = ["--max_steps", "1", "--save_strategy", "no"] if argv[1] == "train" else []
        assert cli.main([*argv[1:], *extra]) == 0, (argv, capsys.readouterr().err[-500:])
    repo = lines[1][4]
    assert hub.files(repo) == {"projector.json", "factors-rank00000-of-00001.safetensors"}
    import json

    from nspo_trl.cli.arguments import parse

    output = Path(parse(["smoke"])[1].output_dir)
    used = json.loads((output / "nspo_projector" / "projector.json").read_text())
    assert used == json.loads((Path(lines[0][5]) / "projector.json").read_text())  # the pushed one, as built


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    """A link from the README, docs/ or benchmarks/README.md to a file of the repository names a file that
    exists and, with ``#anchor``, a heading of that file."""
    pages = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
