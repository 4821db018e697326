"""The contrast subspace: the update held within its held-out budget, benign prompts kept out."""

from __future__ import annotations

import pytest
import torch
from testing_utils import load_reference, make_trainer, nspo_args

from nspo_trl.nullspace.build import prompt_sequences


def test_contrast_subspace_holds_the_update_within_its_held_out_budget(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """``nspo_subspace: contrast``: every group's subspace keeps the held-out preservation energy in it within the
    budget, some group is free to move, every weight change stays inside its subspace, and a cached projector is
    not reused for another budget."""
    budget, cache = 1e-2, tmp_path / "projector"
    contrast = dict(
        nspo_subspace="contrast",
        nspo_contrast_budget=budget,
        nspo_heldout_fraction=0.3,
        nspo_projector_path=str(cache),
    )
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small, nspo_args(tmp_path, max_steps=3, **contrast)
    )
    projector = trainer.projector
    assert projector.metadata["subspace"] == "contrast"
    assert f"held-out preservation energy ≤ {budget:g}" in trainer.nspo_card_section()
    assert any(f.null_dim > 0 for f in projector.factors.values())
    for group, factor in projector.factors.items():
        rows = projector.probes["heldout"][group].double()
        inside = rows @ factor.dense().double()
        assert float(inside.pow(2).sum() / rows.pow(2).sum()) <= budget * (1 + 1e-6), group
        assert factor.stats()["null_lambda_rel"] is None and factor.fit_energy is not None
    reference = load_reference(tiny_model_dir).requires_grad_(False)
    trainer.train()
    for layer in trainer.protected_layers:
        delta = layer.linear.weight.detach().cpu() - reference.get_submodule(layer.name).weight
        projected = delta @ projector.factor_for(layer.name).dense().cpu()
        assert torch.allclose(projected, delta, atol=1e-6), layer.name
    moved = sum(float((layer.linear.weight.detach().cpu() - reference.get_submodule(layer.name).weight).norm())
                for layer in trainer.protected_layers)  # fmt: skip
    assert moved > 0
    with pytest.raises(ValueError, match="contrast_budget"):
        make_trainer(
            tiny_model_dir,
            tokenizer,
            safety_prompts,
            preservation_small,
            nspo_args(tmp_path / "again", max_steps=1, **{**contrast, "nspo_contrast_budget": 2e-2}),
        )


def test_contrast_without_a_held_out_example_is_refused(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """A held-out fraction that rounds to no example leaves nothing to size the contrast subspace on."""
    args = nspo_args(tmp_path, max_steps=1, nspo_subspace="contrast", nspo_heldout_fraction=0.01)
    with pytest.raises(ValueError, match="nspo_heldout_fraction") as info:
        make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args)
    assert "\n" not in str(info.value)


def _benign_prompt_share(trainer) -> dict[str, float]:
    """Per group, the benign training prompts' input energy share ``tr(P C_b) / tr(C_b)`` in the trained subspace."""
    modules = {layer.name: layer.linear for layer in trainer.protected_layers}
    benign = prompt_sequences(
        trainer.train_dataset, trainer.processing_class, False, trainer.args.nspo_preservation_max_length, "benign"
    )
    stats = trainer.projector_builder().collect(modules, benign, covariance=True, description="benign")
    shares = {}
    for group, factor in trainer.projector.factors.items():
        covariance = stats.covariances[group].double()
        projector = factor.dense().double().cpu()
        shares[group] = float(torch.trace(projector @ covariance) / torch.trace(covariance))
    return shares


def test_contrast_protecting_benign_prompts_keeps_their_directions_out(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """``nspo_contrast_protect_benign``: the benign training prompts join the pencil's right side, so their input
    energy in the subspace falls far below what the unprotected contrast subspace holds of it, the held-out
    preservation budget still holds, the card says so, and a projector cached without protection is refused."""
    budget, cache = 1e-2, tmp_path / "projector"
    contrast = dict(nspo_subspace="contrast", nspo_contrast_budget=budget, nspo_heldout_fraction=0.3)
    plain = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path / "plain", max_steps=1, nspo_projector_path=str(cache), **contrast),
    )  # fmt: skip
    protected = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path / "protected", max_steps=1, nspo_contrast_protect_benign=True, **contrast),
    )  # fmt: skip
    assert protected.projector.metadata["contrast_protect_benign"] is True
    assert "protected_digest" in protected.projector.metadata
    assert "benign training prompts protected too" in protected.nspo_card_section()
    before, after = _benign_prompt_share(plain), _benign_prompt_share(protected)
    assert sum(before.values()) > 0.05
    assert sum(after.values()) < 0.2 * sum(before.values()), (before, after)  # measured: 0.023 vs 0.19
    assert all(after[group] < before[group] / 2 for group in before), (before, after)
    for group, factor in protected.projector.factors.items():
        rows = protected.projector.probes["heldout"][group].double()
        assert float((rows @ factor.dense().double()).pow(2).sum() / rows.pow(2).sum()) <= budget * (1 + 1e-6)
    with pytest.raises(ValueError, match="contrast_protect_benign"):
        make_trainer(
            tiny_model_dir, tokenizer, safety_prompts, preservation_small,
            nspo_args(tmp_path / "again", max_steps=1, nspo_contrast_protect_benign=True,
                      nspo_projector_path=str(cache), **contrast),
        )  # fmt: skip


@pytest.mark.parametrize(
    "reshape",
    [
        lambda data: data.remove_columns("is_harmful"),  # nothing says which prompts are benign
        lambda data: data.filter(lambda row: row["is_harmful"]),  # no benign prompt at all
    ],
    ids=["no_label_column", "no_benign_row"],
)
def test_protecting_benign_prompts_needs_labelled_benign_rows(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, reshape
):
    args = nspo_args(
        tmp_path, max_steps=1, nspo_subspace="contrast", nspo_heldout_fraction=0.3, nspo_contrast_protect_benign=True
    )
    with pytest.raises(ValueError, match="nspo_contrast_protect_benign") as info:
        make_trainer(tiny_model_dir, tokenizer, reshape(safety_prompts), preservation_small, args)
    assert "\n" not in str(info.value)
