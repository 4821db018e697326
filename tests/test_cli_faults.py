"""Faults around a training run: each ends in one line on a fresh line, a non-zero exit, and nothing lost."""

from __future__ import annotations

import errno

import pytest
from test_train_cli import REPO, smoke_args
from tqdm import tqdm
from trl.import_utils import is_vllm_available

from nspo_trl import checkpoint as checkpointing
from nspo_trl import train
from nspo_trl.checkpoint import damage
from nspo_trl.train import cli


def last_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.mark.parametrize("where", ["under a file", "empty"])
def test_unusable_output_dir_is_one_line_and_nothing_is_written(where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    output_dir = str(blocker / "out") if where == "under a file" else " "
    args = smoke_args(tmp_path)
    args[args.index("--output_dir") + 1] = output_dir
    assert cli(args) == 2
    line = last_line(capsys)
    assert line.startswith("nspo_trl.train: error: output_dir:"), line
    assert not (tmp_path / "tiny").exists()  # rejected before the tiny model was even built


def test_disk_full_during_a_save_keeps_the_committed_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    real, calls = checkpointing.copy_verified, []

    def fill_disk_on_second_save(source, target, digests):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        real(source, target, digests)

    monkeypatch.setattr(checkpointing, "copy_verified", fill_disk_on_second_save)
    assert cli(smoke_args(tmp_path)) == 1
    line = last_line(capsys)
    assert line.startswith("nspo_trl.train: error:") and "No space left on device" in line and str(calls[1]) in line
    out = tmp_path / "out"
    assert damage(out / "checkpoint-3") is None  # the first checkpoint is intact and committed
    assert damage(out / "checkpoint-6") is not None  # the failed one never counts
    monkeypatch.setattr(checkpointing, "copy_verified", real)
    assert cli([*smoke_args(tmp_path), "--resume_from_checkpoint", "true"]) == 0
    assert (out / "incomplete-checkpoint-6").is_dir() and damage(out / "checkpoint-6") is None


def test_interrupt_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    assert cli(smoke_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("nspo_trl.train: interrupted;")


def test_an_error_under_an_open_progress_bar_starts_its_own_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)

    def fails_mid_bar(*args, **kwargs):
        bar = tqdm(total=10, desc="NSPO covariances")
        bar.update(3)
        raise ValueError("preservation_dataset: broken row 7")

    monkeypatch.setattr(train, "main", fails_mid_bar)
    assert cli(smoke_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.endswith("nspo_trl.train: error: preservation_dataset: broken row 7\n")
    assert "\nnspo_trl.train: error:" in err  # a line of its own, not glued to the bar's last \r-line
    assert not tqdm._instances  # the bar was closed


def write_file(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return str(path)


def empty_dir(tmp_path) -> str:
    path = tmp_path / "data" / "a-directory"
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("no data here")
    return str(path)


def corrupt_model(tmp_path) -> str:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": ')
    return str(path)


def prompts(data: bytes, name: str = "p.jsonl"):
    return lambda t: ["--dataset_name", write_file(t, name, data)]


def preservation(data: bytes, name: str = "k.jsonl"):
    return lambda t: ["--preservation_dataset_name", write_file(t, name, data)]


ROW = b'{"prompt": [{"role": "user", "content": "hi"}], "is_harmful": true}\n'
PRESERVATION = "preservation_dataset_name"
BAD_INPUT = {
    "prompts not utf-8": (prompts(ROW + b'{"prompt": "caf\xe9"}\n'), "dataset_name"),
    "prompts empty file": (prompts(b""), "dataset_name"),
    "prompts corrupt json": (prompts(b'{"prompt": [\n'), "dataset_name"),
    "prompts directory without data": (lambda t: ["--dataset_name", empty_dir(t)], "dataset_name"),
    "prompts without prompt column": (prompts(b'{"question": "hi", "is_harmful": true}\n'), "dataset_name"),
    "prompts without is_harmful for a rule reward": (prompts(b'{"prompt": "hi"}\n'), "reward_funcs"),
    "preservation not utf-8": (preservation(b'{"text": "caf\xe9"}\n'), PRESERVATION),
    "preservation empty csv": (preservation(b"", "k.csv"), PRESERVATION),
    "messages as a string": (preservation(b'{"messages": "hello"}\n'), PRESERVATION),
    "messages as a list of strings": (preservation(b'{"messages": ["a", "b"]}\n'), PRESERVATION),
    "preservation prompt as a number": (preservation(b'{"prompt": 7}\n'), PRESERVATION),
    "preservation without a known layout": (preservation(b'{"question": "q"}\n'), PRESERVATION),
    "corrupt model config": (
        lambda t: ["--model_name_or_path", corrupt_model(t), "--build_tiny_model", "false"],
        "model_name_or_path",
    ),
    "use_vllm without vllm": (lambda t: ["--use_vllm", "true"], "use_vllm"),
    "unimportable reward": (lambda t: ["--reward_funcs", "no_such_module.reward"], "reward_funcs"),
    "zero judge timeout": (lambda t: ["--reward_funcs", "llama_guard", "--judge_timeout", "0"], "judge_timeout"),
    "negative judge retries": (lambda t: ["--judge_max_retries", "-1"], "judge_max_retries"),
    "zero judge concurrency": (lambda t: ["--judge_max_concurrency", "0"], "judge_max_concurrency"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_field_and_nothing_is_written(case, tmp_path, monkeypatch, capsys):
    if case == "use_vllm without vllm" and is_vllm_available():
        pytest.skip("vLLM is installed here; the case needs it absent")
    monkeypatch.chdir(REPO)
    make_args, field = BAD_INPUT[case]
    assert cli([*smoke_args(tmp_path), *make_args(tmp_path)]) == 2
    line = last_line(capsys)
    assert line.startswith("nspo_trl.train: error:") and field in line, line
    assert not (tmp_path / "out").exists()
