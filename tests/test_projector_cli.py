"""``nspo-trl projector build``: the projector training would build, without training; used by a run through
``nspo_projector_from`` only when its record matches the run."""

from __future__ import annotations

import json

import torch
from testing_utils import smoke_args

from nspo_trl.cli import commands
from nspo_trl.nullspace.projector import NullSpaceProjector


def test_the_built_projector_is_the_one_training_builds_and_a_run_uses_it(tmp_path, capsys):
    args = smoke_args(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    built = tmp_path / "projector"
    assert commands.main(["projector", "build", *args, "--output", str(built)]) == 0
    assert f"saved to {built}" in capsys.readouterr().out

    assert commands.main(["train", *args]) == 0  # builds its own projector from the same recipe
    trained = tmp_path / "out" / "nspo_projector"
    assert json.loads((built / "projector.json").read_text()) == json.loads((trained / "projector.json").read_text())
    mine, theirs = NullSpaceProjector.load(built), NullSpaceProjector.load(trained)
    for group, factor in theirs.factors.items():
        assert torch.equal(mine.factors[group].basis, factor.basis), group

    reuse = smoke_args(tmp_path, "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(tmp_path / "reuse"))
    assert commands.main(["train", *reuse, "--nspo_projector_from", str(built)]) == 0
    stored = json.loads((tmp_path / "reuse" / "nspo_projector" / "projector.json").read_text())
    assert (
        stored["metadata"]["model_fingerprint"]
        == json.loads((built / "projector.json").read_text())["metadata"]["model_fingerprint"]
    )


def test_a_run_with_another_rule_refuses_the_projector_in_one_line(tmp_path, capsys):
    args = smoke_args(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    built = tmp_path / "projector"
    assert commands.main(["projector", "build", *args, "--output", str(built)]) == 0
    capsys.readouterr()
    other = smoke_args(tmp_path, "--max_steps", "1", "--output_dir", str(tmp_path / "other"), "--nspo_alpha", "0.5")
    assert commands.main(["train", *other, "--nspo_projector_from", str(built)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"nspo_trl.train: error: nspo_projector_from: {built} was built for another rule")
    assert "nspo_alpha: the projector was built with 5e-05, this run asks for 0.5" in line


def test_build_refuses_an_occupied_output_before_loading_anything(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    argv = ["projector", "build", *smoke_args(tmp_path), "--output", str(occupied)]
    assert commands.main(argv) == 2
    assert "--output: " in capsys.readouterr().err and (occupied / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "tiny").exists()  # refused before the model was built
