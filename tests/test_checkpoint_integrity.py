"""Checkpoint integrity: every damaged file is named, never resumed from, and never spreads.

One 8-step run writes checkpoints 2, 4, 6 and 8 (the reference run). Each case copies that output
folder, damages one file of ``checkpoint-8`` in one way, then resumes:

- from that checkpoint's path: refused with one line naming the file (``CheckpointError``);
- with ``resume_from_checkpoint=True``: the damaged checkpoint is set aside and the run resumes from
  ``checkpoint-6``, ending bit-identical to the reference run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import COMMON, NSPO_COMMON, make_trainer

from nspo_trl import NSPOConfig
from nspo_trl.trainer.checkpointing import CheckpointError, damage, newest_intact

STEPS = 8


def run_args(out: Path, **overrides) -> NSPOConfig:
    settings = {**COMMON, **NSPO_COMMON, "save_strategy": "steps", "save_steps": 2, "max_steps": STEPS}
    return NSPOConfig(output_dir=str(out), **{**settings, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out))
    trainer.train()
    return out, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    path.write_bytes(bytes(data))


def overwrite_values(path: Path) -> None:
    """Same header, same size, other numbers: only a checksum can tell."""
    tensors = load_file(str(path))
    save_file({name: t + 0.5 for name, t in tensors.items()}, str(path))


def delete(path: Path) -> None:
    path.unlink()


DAMAGES = {"truncate": truncate, "garble": garble, "overwrite_values": overwrite_values, "delete": delete}
FILES = {
    "reference": "nspo/reference-rank00000-of-00001.safetensors",
    "factors": "nspo/projector/factors-rank00000-of-00001.safetensors",
    "model": "model.safetensors",
}
CASES = [(f, d) for f in FILES for d in DAMAGES] + [("projector_json", "garble"), ("projector_json", "delete")]
FILES["projector_json"] = "nspo/projector/projector.json"


def damaged_copy(reference_out: Path, tmp_path: Path, file_key: str, how: str) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    victim = out / f"checkpoint-{STEPS}" / FILES[file_key]
    if how == "overwrite_values" and victim.suffix != ".safetensors":
        pytest.skip("values are rewritten in safetensors files only")
    DAMAGES[how](victim)
    return out, victim


@pytest.mark.parametrize(("file_key", "how"), CASES)
def test_damaged_checkpoint_is_named_and_refused(reference_run, tmp_path, file_key, how):
    out, victim = damaged_copy(reference_run[0], tmp_path, file_key, how)
    problem = damage(out / f"checkpoint-{STEPS}")
    assert problem is not None and str(victim) in problem and "\n" not in problem
    assert damage(out / f"checkpoint-{STEPS - 2}") is None  # the damage did not reach the older checkpoint


@pytest.mark.parametrize(("file_key", "how"), [("reference", "overwrite_values"), ("factors", "truncate")])
def test_explicit_resume_from_damaged_checkpoint_fails_in_one_line(
    reference_run, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, file_key, how
):
    out, victim = damaged_copy(reference_run[0], tmp_path, file_key, how)
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out))
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{STEPS}"))
    message = str(info.value)
    assert str(victim) in message and "--resume_from_checkpoint true" in message and "\n" not in message


@pytest.mark.parametrize(
    ("file_key", "how"), [("reference", "overwrite_values"), ("model", "garble"), ("projector_json", "delete")]
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(
    reference_run, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, file_key, how
):
    reference_out, reference_params = reference_run
    out, _ = damaged_copy(reference_out, tmp_path, file_key, how)
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out))
    trainer.train(resume_from_checkpoint=True)
    assert (out / f"damaged-checkpoint-{STEPS}").is_dir()  # set aside for inspection
    assert trainer.state.global_step == STEPS
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, reference_params[name], rtol=0, atol=0, msg=name)
    assert damage(out / f"checkpoint-{STEPS}") is None  # rewritten from step 6, intact


def test_checkpoints_hold_copies_not_links(reference_run):
    out = reference_run[0]
    name = FILES["reference"]
    inodes = {(out / f"checkpoint-{s}" / name).stat().st_ino for s in (2, 4, 6, 8)}
    inodes.add((out / "_nspo_state" / name.removeprefix("nspo/")).stat().st_ino)
    assert len(inodes) == 5


def test_commit_record_lists_every_file_with_its_digest(reference_run):
    checkpoint = reference_run[0] / f"checkpoint-{STEPS}"
    record = json.loads((checkpoint / "nspo" / "COMMITTED").read_text())
    assert record["global_step"] == STEPS
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(record["files"]) == on_disk - {"nspo/COMMITTED"}
    assert all(len(entry["sha256"]) == 64 for entry in record["files"].values())
    assert record["projector_metadata"]["rule"]["alpha"] == NSPO_COMMON["nspo_alpha"]


def test_garbled_commit_record_is_named(reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run[0], out)
    marker = out / f"checkpoint-{STEPS}" / "nspo" / "COMMITTED"
    marker.write_text('{"global_step": 8, "fil')
    assert str(marker) in damage(out / f"checkpoint-{STEPS}")
    assert newest_intact(out) == out / f"checkpoint-{STEPS - 2}"
    assert (out / f"damaged-checkpoint-{STEPS}").is_dir()


def test_damage_to_the_state_source_is_not_copied_into_new_checkpoints(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    out = tmp_path / "out"
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out, max_steps=2))
    trainer.train()
    overwrite_values(out / "_nspo_state" / FILES["reference"].removeprefix("nspo/"))
    with pytest.raises(CheckpointError, match="changed since this run wrote it"):
        trainer.save_nspo_state(out / "checkpoint-2")
    assert damage(out / "checkpoint-2") is None  # the committed checkpoint is untouched


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"nspo_alpha": 1e-3}, "nspo_alpha: the checkpoint was built with 1e-10, this run asks for 0.001"),
        ({"nspo_max_null_rank": 3}, "nspo_max_null_rank: the checkpoint was built with None, this run asks for 3"),
        ({"nspo_preservation_max_length": 10}, "data_digest"),
        ({"nspo_covariance_dtype": "float32"}, "covariance_dtype"),
        ({"nspo_target_modules": ["attention"]}, "target_modules"),
    ],
)
def test_resume_with_another_projector_setting_is_refused(
    reference_run, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, override, field
):
    out = tmp_path / "out"
    shutil.copytree(reference_run[0], out)
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out, **override))
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=True)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_resume_with_other_preservation_data_is_refused(
    reference_run, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(reference_run[0], out)
    fewer = preservation_small.select(range(3))
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, fewer, run_args(out))
    with pytest.raises(CheckpointError, match="data_digest"):
        trainer.train(resume_from_checkpoint=True)


def test_resumed_anchor_comes_from_the_file_not_the_model(
    reference_run, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """Resume from checkpoint-6: the model then holds trained weights, the anchor must be W_ref."""
    reference_out, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    saved = load_file(str(out / f"checkpoint-{STEPS - 2}" / FILES["reference"]))
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out))
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{STEPS - 2}"))
    moved = 0
    for name, anchor in trainer.constrained_update.reference.items():
        torch.testing.assert_close(anchor, saved[name], rtol=0, atol=0)
        moved += int(not torch.equal(anchor, trainer.model.get_submodule(name).weight.detach()))
    assert moved > 0  # the trained weights differ from the anchors, so the two could not be confused


def test_older_checkpoints_are_rotated_only_after_the_new_one_is_committed(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    out = tmp_path / "out"
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small, run_args(out, max_steps=6, save_total_limit=1)
    )
    real = trainer.save_nspo_state
    intact_before_commit: list[list[str]] = []

    def spy(directory):
        # the new checkpoint is on disk but not committed: an older, intact one must still be there
        intact_before_commit.append([p.name for p in out.glob("checkpoint-*") if damage(p) is None])
        real(directory)

    trainer.save_nspo_state = spy
    trainer.train()
    assert intact_before_commit == [[], ["checkpoint-2"], ["checkpoint-4"]]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
