"""``python -m nspo_trl.train``: the smoke recipe end to end, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from testing_utils import REPO, smoke_args

from nspo_trl.cli.arguments import DEFAULT_RECIPE
from nspo_trl.cli.packaged import RECIPES_DIR
from nspo_trl.cli.train import cli


def test_smoke_recipe_writes_model_projector_checkpoints_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli(smoke_args(tmp_path)) == 0
    out = tmp_path / "out"
    assert (tmp_path / "tiny" / "config.json").is_file()  # built locally on first use
    assert (out / "model.safetensors").is_file()
    assert (out / "nspo_projector" / "factors-rank00000-of-00001.safetensors").is_file()
    for step in (3, 6):
        assert (out / f"checkpoint-{step}" / "nspo" / "reference-rank00000-of-00001.safetensors").is_file()
    summary = json.loads((out / "nspo_summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["projector"]["modules"] == 6 and summary["projector"]["groups"] == 4
    assert 0 < summary["projector"]["null_fraction"] < 1
    assert set(summary["leakage"]) == {"fit", "heldout"}
    assert summary["leakage"]["fit"] < 0.05
    assert summary["reward_first"] is not None and -1.0 <= summary["reward_last"] <= 0.0


def test_default_recipe_is_the_smoke_recipe():
    assert DEFAULT_RECIPE == (REPO / "recipes" / "smoke.yaml").resolve() == RECIPES_DIR / "smoke.yaml"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--nspo_alpha", "1.5"], "nspo_alpha"),
        (["--nspo_target_modules", "no_such_layer"], "nspo_target_modules"),
        (["--preservation_dataset_name", "nspo_trl:nope"], "nspo_trl:nope"),
        (["--reward_funcs", "not_a_reward"], "reward_funcs"),
        (["--nspo_heldout_fraction", "1.0"], "nspo_heldout_fraction"),
        (["--heldout_harmful_dataset", "nspo_trl:harmbench"], "heldout_general_dataset"),
        (["--heldout_general_dataset", "nspo_trl:general_prompts"], "heldout_general_dataset"),
        (["--heldout_max_new_tokens", "0"], "heldout_max_new_tokens"),
        (["--nspo_build_memory_gb", "0"], "nspo_build_memory_gb"),
        (["--nspo_build_memory_gb", "nan"], "nspo_build_memory_gb"),
        (["--nspo_projector_offload", "maybe"], "nspo_projector_offload"),
        (["--harmful_fraction", "0"], "harmful_fraction"),
        (["--harmful_fraction", "1"], "harmful_fraction"),
        (["--harmful_fraction", "1.5"], "harmful_fraction"),
        (["--harmful_fraction", "nan"], "harmful_fraction"),
        (["--harmful_fraction", "0.5", "--harmful_only", "true"], "harmful_fraction"),
        (["--use_vllm", "true", "--vllm_enable_sleep_mode", "true"], "vllm_enable_sleep_mode"),  # colocate, CPU
        (["--model_name_or_path", "someone/absent-model", "--build_tiny_model", "false"], "model_name_or_path"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, extra, field):
    monkeypatch.chdir(REPO)
    assert cli(smoke_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nspo_trl.train: error:") and field in err[-1]
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_missing_recipe(tmp_path, capsys):
    assert cli([str(tmp_path / "absent.yaml")]) == 2
    assert "recipe:" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    """The real `python -m` entry point returns 2 on bad input (no traceback)."""
    result = subprocess.run(
        [sys.executable, "-m", "nspo_trl.train", *smoke_args(tmp_path, "--nspo_alpha", "0")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "nspo_alpha" in result.stderr.strip().splitlines()[-1]


def test_pku_prompts_with_the_llama_guard_server(tmp_path, monkeypatch):
    from guard_server import MODEL, GuardServer

    monkeypatch.chdir(REPO)
    fixture = str(REPO / "tests" / "fixtures" / "pku_saferlhf.jsonl")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(
        json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}) + "\n"
        for i in range(12)
    ))  # fmt: skip
    with GuardServer() as server:
        code = cli(smoke_args(
            tmp_path, "--dataset_name", fixture, "--train_fraction", "0.5", "--harmful_only", "false",
            "--reward_funcs", "llama_guard", "--judge_base_url", server.base_url, "--judge_model", MODEL,
            "--judge_max_retries", "1", "--preservation_dataset_name", str(alpaca),
            "--preservation_prompt_column", "instruction", "--preservation_response_column", "output",
        ))  # fmt: skip
    assert code == 0
    assert sum(server.requests.values()) == 6 * 8  # every completion judged once: 6 steps x 8 completions
    summary = json.loads((tmp_path / "out" / "nspo_summary.json").read_text())
    assert summary["reward_last"] == 0.0  # no keyword in a tiny model's output: all safe


def test_unreachable_judge_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = cli(smoke_args(tmp_path, "--reward_funcs", "llama_guard", "--judge_base_url", "http://127.0.0.1:9/v1"))
    assert code == 2
    assert "vllm serve" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def generation_calls(tmp_path, monkeypatch) -> list[tuple[list, int]]:
    """Every call of the preservation-answer generator, as (prompts, max_new_tokens); cache in tmp_path."""
    import nspo_trl.cli.train as train_module

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "cache"))
    calls = []
    real = train_module.generate_preservation_responses

    def spy(prompt_list, model_path, max_new_tokens):
        calls.append((list(prompt_list), max_new_tokens))
        return real(prompt_list, model_path, max_new_tokens, use_vllm=False)

    monkeypatch.setattr(train_module, "generate_preservation_responses", spy)
    return calls


def test_generated_preservation_answers_only_the_kept_subset(tmp_path, generation_calls):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(40)))
    code = cli(smoke_args(
        tmp_path, "--preservation_dataset_name", str(prompts), "--generate_preservation_responses", "true",
        "--preservation_max_new_tokens", "4", "--nspo_num_preservation_samples", "5",
    ))  # fmt: skip
    assert code == 0
    assert len(generation_calls) == 1 and len(generation_calls[0][0]) == 5  # 5 of 40 prompts answered, not all
    summary = json.loads((tmp_path / "out" / "nspo_summary.json").read_text())
    assert summary["projector"]["modules"] == 6


def test_generated_preservation_answers_are_cached(tmp_path, generation_calls):
    """A second run with the same model, prompts and length reads the answers back instead of generating."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} colours."}) + "\n" for i in range(6)))
    extra = ["--preservation_dataset_name", str(prompts), "--generate_preservation_responses", "true",
             "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    for run, tokens in ((1, "4"), (2, "4"), (3, "5")):
        args = smoke_args(tmp_path, *extra, "--preservation_max_new_tokens", tokens)
        args[args.index("--output_dir") + 1] = str(tmp_path / f"out{run}")
        assert cli(args) == 0
    assert [tokens for _, tokens in generation_calls] == [
        4,
        5,
    ]  # run 2 read run 1's answers; another length: a new key
    cached = list((tmp_path / "cache" / "preservation").glob("*.jsonl"))
    assert len(cached) == 2


def test_heldout_summary_reports_refusal_and_drift(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = cli(smoke_args(
        tmp_path, "--heldout_harmful_dataset", "nspo_trl:safety_prompts", "--heldout_harmful_split", "train",
        "--heldout_general_dataset", "nspo_trl:general_prompts", "--heldout_max_new_tokens", "6",
        "--heldout_overrefusal_dataset", "nspo_trl:overrefusal_prompts", "--heldout_capability", "true",
    ))  # fmt: skip
    assert code == 0
    held = json.loads((tmp_path / "out" / "nspo_summary.json").read_text())["heldout"]
    assert held["heldout_refusal_before"] == 0.0  # a random tiny model never writes a refusal phrase
    assert 0.0 <= held["heldout_refusal_after"] <= 1.0
    assert held["heldout_declined_before"] == 0.0 and 0.0 <= held["heldout_declined_after"] <= 1.0
    assert held["general_kl_mean"] > 1e-6  # 6 steps at lr 1e-2 move a tiny model's attention freely
    assert 0.0 <= held["general_top1_agreement"] <= 1.0
    printed = " ".join(capsys.readouterr().out.split())
    assert "held-out harmful refused 0.00 ->" in printed
    # a random tiny model answers no arithmetic or fact exactly, before or after
    assert held["capability_before"] == 0.0 and held["capability_after"] == 0.0
    assert "| capability (exact match) 0.00 -> 0.00" in printed
    pytest.importorskip("sentence_transformers")
    for key in ("learned_unsafe", "learned_overrefusal"):
        assert 0.0 <= held[f"{key}_before"] <= 1.0 and 0.0 <= held[f"{key}_after"] <= 1.0
    assert "| unsafe (learned judge)" in printed and "| over-refusal (learned judge)" in printed


def test_the_model_card_keeps_every_row_the_trainer_and_the_command_set(tmp_path, monkeypatch):
    """The command adds its rows (data, reward, preservation) to the trainer's own (an untied output layer)."""
    from nspo_trl.cli.arguments import parse
    from nspo_trl.cli.train import build_trainer
    from nspo_trl.models.tiny_model import build_tiny_model

    monkeypatch.chdir(REPO)
    build_tiny_model(tmp_path / "tied", tie_word_embeddings=True, hidden_size=64, intermediate_size=128)
    args = smoke_args(tmp_path, "--nspo_untie_word_embeddings", "true", "--nspo_target_modules", "full")
    args[args.index("--model_name_or_path") + 1] = str(tmp_path / "tied")
    trainer = build_trainer(*parse([*args, "--build_tiny_model", "false"]))
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    for row in ("output layer", "safety training data", "reward", "preservation data"):
        assert f"| {row} |" in card, row
    assert "untied from the input embeddings" in card
