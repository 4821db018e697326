"""push_to_hub at the huggingface_hub boundary: the model card and the uploaded file set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import transformers.trainer
from huggingface_hub.utils import filter_repo_objects


class FakeHub:
    """Records create_repo/upload_folder and computes the files upload_folder would send."""

    def __init__(self):
        self.repos, self.uploaded = [], set()

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        self.uploaded = set(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1")


def pushed(tmp_path, monkeypatch, trainer_inputs, **settings) -> tuple[FakeHub, str]:
    from testing_utils import make_trainer, nspo_args

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
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
    assert hub.repos == ["me/tiny-nspo"]
    for expected in ("README.md", "model.safetensors", "config.json", "eval/report.md"):
        assert expected in hub.uploaded, expected
    # no checkpoints, never the reference weights kept for checkpoints, no projector, no local folders
    assert not [f for f in hub.uploaded if f.startswith(("checkpoint-", "_nspo_state", "nspo_projector", "tiny-"))]
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
    assert set(PROJECTOR_FILES) <= hub.uploaded
    assert not [f for f in hub.uploaded if f.startswith(("tiny-", "_nspo_state"))]
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
