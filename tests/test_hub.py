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


def test_push_to_hub_sends_card_model_and_projector(tiny_model_dir, tokenizer, safety_prompts, preservation_small,
                                                    tmp_path, monkeypatch):  # fmt: skip
    from test_trainer import make_trainer, nspo_args

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_model_id="me/tiny-nspo"),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub()

    assert hub.repos == ["me/tiny-nspo"]
    projector_files = ("nspo_projector/projector.json", "nspo_projector/factors-rank00000-of-00001.safetensors")
    for expected in ("README.md", "model.safetensors", "config.json", *projector_files):
        assert expected in hub.uploaded, expected
    # no checkpoints, and never the reference weights kept for checkpoints
    assert not [f for f in hub.uploaded if f.startswith(("checkpoint-", "_nspo_state"))]
    assert (tmp_path / "out" / "_nspo_state" / "reference-rank00000-of-00001.safetensors").is_file()

    card = (tmp_path / "out" / "README.md").read_text()
    for needle in ("- nspo", "- grpo", "- trl", "2512.11391", "2402.03300", "## NSPO", "leakage (fit)",
                   "| `model.layers.0.mlp.gate_proj` | 64 |", "nspo_projector/"):  # fmt: skip
        assert needle in card, needle
