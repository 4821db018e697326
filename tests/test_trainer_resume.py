"""Resuming, projection intervals before checkpoints, and the projector cache."""

from __future__ import annotations

import pytest
import torch
from testing_utils import COMMON, NSPO_COMMON, capture_inputs, leakage, load_reference, make_trainer, nspo_args

from nspo_trl import NSPOConfig, NSPOTrainer


@pytest.mark.parametrize("null_space_adamw", [False, True])
def test_resume_restores_state_and_continues_identically(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, null_space_adamw
):
    """Bitwise, with AdamW or with ``NullSpaceAdamW`` (its ``(out, k)`` moments restored from the checkpoint)."""

    def args(out, **kw):
        settings = {"save_strategy": "steps", "save_steps": 4, "max_steps": 8, **kw}
        return NSPOConfig(
            output_dir=str(out), nspo_null_space_adamw=null_space_adamw, **{**COMMON, **NSPO_COMMON, **settings}
        )

    straight = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args(tmp_path / "a"))
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "nspo" / "projector" / "factors-rank00000-of-00001.safetensors").is_file()
    assert (checkpoint / "nspo" / "reference-rank00000-of-00001.safetensors").is_file()

    resumed = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args(tmp_path / "a"))
    # corrupt the in-memory anchor: resuming must restore it from the checkpoint
    for ref in resumed.constrained_update.reference.values():
        ref.add_(1.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, ref in resumed.constrained_update.reference.items():
        torch.testing.assert_close(ref, straight.constrained_update.reference[name], rtol=0, atol=0)
    straight_params = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, straight_params[name], rtol=0, atol=0, msg=name)


def test_interval_projects_before_checkpoints(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    from safetensors.torch import load_file

    reference = load_reference(tiny_model_dir)
    name = "model.layers.0.mlp.down_proj"
    x = capture_inputs(reference, preservation_sequences, [name], tokenizer.pad_token_id)[name]
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=7, nspo_project_every=5, save_strategy="steps", save_steps=3),
    )
    trainer.train()
    ref_w = reference.get_submodule(name).weight
    for step in (3, 6, 7):  # none of them is a multiple of 5, yet each checkpoint is projected
        saved = load_file(str(tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors"))[f"{name}.weight"]
        assert leakage(saved, ref_w, x) <= 1e-6, step
        assert (saved - ref_w).norm() > 0


def test_projector_cache_is_reused_and_guarded(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    cache = tmp_path / "cache"
    first = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path, max_steps=1, nspo_projector_path=str(cache)),
    )  # fmt: skip
    assert (cache / "factors-rank00000-of-00001.safetensors").is_file()
    # no preservation data needed once cached; factors and probes come back unchanged
    second = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        None,
        nspo_args(tmp_path, max_steps=1, nspo_projector_path=str(cache)),
    )
    for group, factor in first.projector.factors.items():
        torch.testing.assert_close(second.projector.factors[group].basis, factor.basis, rtol=0, atol=0)
        torch.testing.assert_close(
            second.projector.probes["fit"][group], first.projector.probes["fit"][group].cpu(), rtol=0, atol=0
        )
    # a cache built under another rule or from other data is refused, naming the field
    for overrides, preservation in (({"nspo_alpha": 1e-3}, preservation_small), ({}, preservation_small.select([0]))):
        with pytest.raises(ValueError, match="nspo_projector_path") as info:
            make_trainer(
                tiny_model_dir, tokenizer, safety_prompts, preservation,
                nspo_args(tmp_path, max_steps=1, nspo_projector_path=str(cache), **overrides),
            )  # fmt: skip
        assert ("rule" in str(info.value)) == ("nspo_alpha" in overrides)


def test_checkpoint_state_belongs_to_the_run_that_wrote_it(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """A second run in the same output_dir (other α) must not reuse the first run's saved projector."""
    from nspo_trl.nullspace.projector import NullSpaceProjector

    for alpha in (1e-10, 1e-3):
        trainer = make_trainer(
            tiny_model_dir, tokenizer, safety_prompts, preservation_small,
            nspo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, nspo_alpha=alpha),
        )  # fmt: skip
        trainer.train()
        saved = NullSpaceProjector.load(tmp_path / "out" / "checkpoint-2" / "nspo" / "projector")
        assert saved.rule.alpha == alpha
    assert "2402.03300" in NSPOTrainer._paper["citation"] and "2512.11391" in NSPOTrainer._paper["citation"]
