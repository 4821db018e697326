"""Faults around a training run: each ends in one line on a fresh line, a non-zero exit, and nothing lost."""

from __future__ import annotations

import errno

import pytest
from testing_utils import REPO, smoke_args
from tqdm import tqdm
from trl.import_utils import is_vllm_available

from nspo_trl.cli import train
from nspo_trl.cli.train import cli
from nspo_trl.trainer import checkpointing
from nspo_trl.trainer.checkpointing import damage


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
    out = tmp_path / "out"
    assert line.startswith(f"nspo_trl.train: error: {out / 'checkpoint-6'}: could not write the checkpoint (No space")
    assert "it needs about" in line and "GiB are free there" in line
    assert damage(out / "checkpoint-3") is None  # the first checkpoint is intact and committed
    assert not (out / "checkpoint-6").exists()  # the partial one is removed
    monkeypatch.setattr(checkpointing, "copy_verified", real)
    assert cli([*smoke_args(tmp_path), "--resume_from_checkpoint", "true"]) == 0
    assert damage(out / "checkpoint-6") is None


def test_torch_writer_failure_on_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """torch's zip writer reports a full disk as a RuntimeError; it ends the same way as an OSError."""
    import torch

    monkeypatch.chdir(REPO)
    real, saves = torch.save, []

    def full_disk_at_the_second_checkpoint(obj, f, *args, **kwargs):
        saves.append(str(f))
        if "checkpoint-6" in str(f):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_the_second_checkpoint)
    assert cli(smoke_args(tmp_path)) == 1
    line = last_line(capsys)
    out = tmp_path / "out"
    assert any("checkpoint-6" in s for s in saves)
    assert line.startswith(f"nspo_trl.train: error: {out / 'checkpoint-6'}: could not write the checkpoint"), line
    assert "PytorchStreamWriter failed" in line and "it needs about" in line
    assert damage(out / "checkpoint-3") is None and not (out / "checkpoint-6").exists()


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
    "temperature zero": (lambda t: ["--temperature", "0"], "temperature"),
    "LoRA with DoRA": (lambda t: ["--use_peft", "true", "--use_dora", "true"], "use_dora"),
    "projector path without a projector": (lambda t: ["--nspo_projector_path", empty_dir(t)], "nspo_projector_path"),
    "resume from a folder that is no checkpoint": (
        lambda t: ["--resume_from_checkpoint", empty_dir(t)],
        "resume_from_checkpoint",
    ),
    "resume true before anything was saved": (
        lambda t: ["--resume_from_checkpoint", "true"],
        "resume_from_checkpoint",
    ),
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


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("model_init_kwargs: [1, 2]", "model_init_kwargs: [1, 2] is not a valid dict[str, Any] | str | None."),
        ("reward_weights: {refusal: 1.0}", "reward_weights: {'refusal': 1.0} is not a valid list[float] | None."),
        ("nspo_energy: [0.5]", "nspo_energy: [0.5] is not a valid float | None."),
    ],
)
def test_a_mapping_or_list_of_the_wrong_kind_is_refused_before_anything_is_written(
    line, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((REPO / "recipes" / "smoke.yaml").read_text() + line + "\n")
    args = smoke_args(tmp_path)
    args[0] = str(recipe)
    assert cli(args) == 2
    assert last_line(capsys) == f"nspo_trl.train: error: {message}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny").exists()
