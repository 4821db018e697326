"""The memory-bounded projector build: the same projector in any number of passes, never over budget."""

from __future__ import annotations

import torch
from test_trainer import make_trainer, nspo_args

from nspo_trl.nullspace import collect


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
