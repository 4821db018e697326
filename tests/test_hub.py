"""The Hub boundary, against a local stand-in whose remote is a folder (``testing_utils.LocalHub``): what
push_to_hub uploads, the model card, and a projector pushed, pulled and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nspo_trl import NSPOTrainer


def pushed(tmp_path, monkeypatch, trainer_inputs, **settings):
    from testing_utils import LocalHub, make_trainer, nspo_args

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(NSPOTrainer, "hub_api", lambda self, token=None: hub)
    trainer = make_trainer(
        *trainer_inputs,
        nspo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_model_id="me/tiny-nspo", **settings),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    # a local folder inside output_dir (the smoke recipe builds its tiny model there): never uploaded
    (tmp_path / "out" / "tiny-qwen2").mkdir()
    (tmp_path / "out" / "tiny-qwen2" / "model.safetensors").write_bytes(b"0" * 64)
    (tmp_path / "out" / "eval").mkdir()
    (tmp_path / "out" / "eval" / "report.md").write_text("| metric | model |\n|---|---|\n| unsafe rate | 0.25 |\n")
    trainer.card_details["base model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer.push_to_hub(dataset_name="nspo_trl:safety_mix")
    return hub, (tmp_path / "out" / "README.md").read_text()


PROJECTOR_FILES = ("nspo_projector/projector.json", "nspo_projector/factors-rank00000-of-00001.safetensors")


def test_push_to_hub_sends_the_model_and_card_only(tiny_model_dir, tokenizer, safety_prompts, preservation_small,
                                                   tmp_path, monkeypatch):  # fmt: skip
    hub, card = pushed(tmp_path, monkeypatch, (tiny_model_dir, tokenizer, safety_prompts, preservation_small))
    uploaded = hub.files("me/tiny-nspo")
    assert [c["repo_id"] for c in hub.commits] == ["me/tiny-nspo"]
    for expected in ("README.md", "model.safetensors", "config.json", "eval/report.md"):
        assert expected in uploaded, expected
    # no checkpoints, never the reference weights kept for checkpoints, no projector, no local folders
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "_nspo_state", "nspo_projector", "tiny-"))]
    assert (hub.remote / "me/tiny-nspo/README.md").read_text() == card
    assert (tmp_path / "out" / "_nspo_state" / "reference-rank00000-of-00001.safetensors").is_file()

    for needle in ("- nspo", "- grpo", "- trl", "2512.11391", "2402.03300", "## NSPO", "leakage (fit)",
                   "| `model.layers.0.mlp.gate_proj` | 64 |", "null dimensions |", "not uploaded with the model",
                   "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)",
                   "## Evaluation", "| unsafe rate | 0.25 |", "| base model | HuggingFaceTB/SmolLM2-135M-Instruct |",
                   "| reward |"):  # fmt: skip
        assert needle in card, needle
    assert "[None]" not in card and "datasets/nspo_trl:safety_mix" not in card  # no links to nowhere


def test_push_to_hub_sends_the_projector_when_asked(tiny_model_dir, tokenizer, safety_prompts, preservation_small,
                                                    tmp_path, monkeypatch):  # fmt: skip
    hub, card = pushed(
        tmp_path,
        monkeypatch,
        (tiny_model_dir, tokenizer, safety_prompts, preservation_small),
        nspo_push_projector=True,
    )
    uploaded = hub.files("me/tiny-nspo")
    assert set(PROJECTOR_FILES) <= uploaded
    assert not [f for f in uploaded if f.startswith(("tiny-", "_nspo_state"))]
    size = sum(f.stat().st_size for f in (tmp_path / "out" / "nspo_projector").rglob("*") if f.is_file())
    assert f"({size / 2**20:.1f} MiB) is in `nspo_projector/`" in card


def test_a_local_base_model_is_named_not_none(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path):
    from testing_utils import make_trainer, nspo_args

    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small, nspo_args(tmp_path, max_steps=1)
    )
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"a fine-tuned version of a local model (`{Path(tiny_model_dir).name}`)" in card and "[None]" not in card


def test_the_card_names_every_row_the_trainer_and_the_cli_set(tiny_model_dir, tokenizer, safety_prompts,
                                                              preservation_small, tmp_path):  # fmt: skip
    from testing_utils import make_trainer, nspo_args

    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small, nspo_args(tmp_path, max_steps=1)
    )
    trainer.card_details.update({"base model": "org/base", "training data": "nspo_trl:safety_mix (64 prompts)"})
    trainer.create_model_card(model_name="tiny-nspo", tags="safety")
    card = (tmp_path / "out" / "README.md").read_text()
    for key, value in trainer.card_details.items():
        assert f"| {key} | {value} |" in card, key
    front = card.split("---")[1]
    for tag in ("generated_from_trainer", "nspo", "grpo", "trl", "safety"):
        assert f"- {tag}" in front, tag
    assert "base_model: org/base" in front and "# Model Card for tiny-nspo" in card


def test_a_projector_is_pushed_pulled_and_checked(tiny_model_dir, tokenizer, safety_prompts, preservation_small,
                                                   tmp_path, monkeypatch):  # fmt: skip
    """Pushed to the stand-in Hub, the projector trains a second run by repo id, exactly as built; a run whose
    rule differs is refused in one line naming the field, before training."""
    from testing_utils import LocalHub, make_trainer, nspo_args

    from nspo_trl.trainer.hub import push_projector

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(NSPOTrainer, "hub_api", lambda self, token=None: hub)
    first = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small,
                         nspo_args(tmp_path / "a", max_steps=1))  # fmt: skip
    push_projector(tmp_path / "a" / "out" / "nspo_projector", "me/tiny-projector", hub)
    assert hub.files("me/tiny-projector") == {f.removeprefix("nspo_projector/") for f in PROJECTOR_FILES}

    second = make_trainer(tiny_model_dir, tokenizer, safety_prompts, None,
                          nspo_args(tmp_path / "b", max_steps=1, nspo_projector_from="me/tiny-projector"))  # fmt: skip
    for group, factor in first.projector.factors.items():
        assert torch.equal(second.projector.factors[group].basis, factor.basis), group

    with pytest.raises(ValueError, match=r"^nspo_projector_from: .* was built for another rule .*nspo_alpha") as info:
        make_trainer(
            tiny_model_dir,
            tokenizer,
            safety_prompts,
            None,
            nspo_args(tmp_path / "c", max_steps=1, nspo_projector_from="me/tiny-projector", nspo_alpha=0.5),
        )
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="nspo_projector_from: cannot download me/missing"):
        make_trainer(tiny_model_dir, tokenizer, safety_prompts, None,
                     nspo_args(tmp_path / "d", max_steps=1, nspo_projector_from="me/missing"))  # fmt: skip


def test_pushing_a_folder_that_is_not_a_projector_uploads_nothing(tmp_path):
    from testing_utils import LocalHub

    from nspo_trl.trainer.hub import push_projector

    hub = LocalHub(tmp_path / "hub")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "projector.json").write_text("{}")
    with pytest.raises(ValueError, match="notes: not a projector"):
        push_projector(tmp_path / "notes", "me/p", hub)
    assert not hub.commits and not (hub.remote / "me").exists()
