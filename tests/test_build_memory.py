"""The memory-bounded projector build: the same projector in any number of passes, never over budget."""

from __future__ import annotations

import torch
from testing_utils import make_trainer, nspo_args

from nspo_trl.nullspace import collect
from nspo_trl.planning.plan import memory_plan, model_config


class CovarianceMeter:
    """Peak bytes of covariance held at once by every live collector (an instrumented ``_accumulate``)."""

    def __init__(self, monkeypatch):
        self.live: list[collect.CovarianceCollector] = []
        self.peak = 0
        real = collect.CovarianceCollector._accumulate
        meter = self

        def accumulate(collector, name, x):
            real(collector, name, x)
            if collector not in meter.live:
                meter.live.append(collector)
            held = sum(c.element_size() * c.numel() for col in meter.live for c in col.covariances.values())
            meter.peak = max(meter.peak, held)

        monkeypatch.setattr(collect.CovarianceCollector, "_accumulate", accumulate)


def build(tiny_model_dir, tokenizer, safety_prompts, preservation_small, out, **overrides):
    args = nspo_args(out, max_steps=1, nspo_heldout_fraction=0.25, **overrides)
    return make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args).projector


def test_a_budgeted_build_equals_the_single_pass_build_and_stays_under_budget(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, monkeypatch
):
    meter = CovarianceMeter(monkeypatch)
    whole = build(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path / "one")
    single_pass_peak = meter.peak
    widths = {group: factor.in_features for group, factor in whole.factors.items()}
    largest = max(w * w * 8 for w in widths.values())  # float64 covariances
    assert single_pass_peak == sum(w * w * 8 for w in widths.values())  # one pass holds every group

    meter.peak, meter.live = 0, []
    budget_gb = largest / 2**30  # room for the largest group alone: one pass per group or so
    passes = build(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        tmp_path / "many",
        nspo_build_memory_gb=budget_gb,
    )
    assert meter.peak <= largest < single_pass_peak
    assert passes.groups == whole.groups and passes.metadata == whole.metadata
    for group, factor in whole.factors.items():
        other = passes.factors[group]
        assert other.null_dim == factor.null_dim and other.kind == factor.kind
        assert torch.equal(other.eigenvalues, factor.eigenvalues) and torch.equal(other.basis, factor.basis), group
    for split, rows in whole.probes.items():
        assert rows.keys() == passes.probes[split].keys()
        assert all(torch.equal(rows[g], passes.probes[split][g]) for g in rows), split


def test_a_contrast_build_holds_its_three_covariances_within_the_budget_and_as_planned(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, monkeypatch
):
    """``nspo_subspace: contrast`` with ``nspo_contrast_protect_benign`` holds ``C``, ``C_train`` and ``C_benign``
    of a pass at once: in one pass three times every group's covariance, which is what ``plan.memory_plan``
    states; with a budget of three times the largest group, never more than the budget, and the same projector."""
    contrast = dict(nspo_subspace="contrast", nspo_contrast_budget=1e-2, nspo_contrast_protect_benign=True)
    meter = CovarianceMeter(monkeypatch)
    whole = build(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path / "one", **contrast)
    widths = {group: factor.in_features for group, factor in whole.factors.items()}
    assert meter.peak == 3 * sum(w * w * 8 for w in widths.values())
    planned = memory_plan(
        model_config(str(tiny_model_dir)), ["mlp"], 4, "float64", covariance_copies=3, contrast=True
    )["covariances_build"]
    assert planned == meter.peak

    meter.peak, meter.live = 0, []
    budget = 3 * max(w * w * 8 for w in widths.values())
    passes = build(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path / "many",
        nspo_build_memory_gb=budget / 2**30, **contrast,
    )  # fmt: skip
    assert meter.peak <= budget < 3 * sum(w * w * 8 for w in widths.values())
    assert passes.metadata == whole.metadata
    for group, factor in whole.factors.items():
        assert passes.factors[group].null_dim == factor.null_dim, group
        assert torch.allclose(passes.factors[group].dense(), factor.dense(), atol=1e-6), group
