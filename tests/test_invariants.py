"""Invariants that a one-line mistake would break silently: each test here fails on such a mistake.

(The mutation check ``tests/mutation_check.py`` applies those mistakes and expects these to fail.)
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import capture_inputs, leakage, load_reference, make_trainer, nspo_args

from nspo_trl.eval.drift import drift_report
from nspo_trl.nullspace import collect
from nspo_trl.nullspace.sharding import check_agreement


def hand_kl(reference, model, sequences) -> float:
    """Mean over predicted positions of Σ_v q(v) (log q(v) − log p(v)), q the reference, by plain loops."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            batch = torch.tensor([ids])
            q = reference(batch).logits[0].double().log_softmax(-1)
            p = model(batch).logits[0].double().log_softmax(-1)
            for t in range(len(ids) - 1):
                total += sum(float(q[t, v].exp() * (q[t, v] - p[t, v])) for v in range(q.shape[-1]))
                count += 1
    return total / count


def test_drift_kl_matches_a_hand_computed_value(tiny_model_dir, tokenizer, preservation_sequences):
    reference = load_reference(tiny_model_dir).eval()
    model = load_reference(tiny_model_dir).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    sequences = preservation_sequences[:2]
    expected = hand_kl(reference, model, sequences)
    reverse = hand_kl(model, reference, sequences)
    report = drift_report(model, reference, sequences, tokenizer.pad_token_id, None, progress=False)
    assert expected > 1e-3 and abs(expected - reverse) > 1e-4 * expected  # nonzero and asymmetric: swaps show
    assert report["kl_mean"] == pytest.approx(expected, rel=1e-9)


def test_trainer_accumulates_covariances_in_the_configured_dtype(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, monkeypatch
):
    seen: list[torch.dtype] = []
    real = collect.CovarianceCollector.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.dtype)

    monkeypatch.setattr(collect.CovarianceCollector, "__init__", spy)
    for dtype in ("float32", "float64"):
        seen.clear()
        make_trainer(
            tiny_model_dir, tokenizer, safety_prompts, preservation_small,
            nspo_args(tmp_path / dtype, max_steps=1, nspo_covariance_dtype=dtype),
        )  # fmt: skip
        assert seen and set(seen) == {getattr(torch, dtype)}


def test_heldout_probes_come_from_heldout_examples_only(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path, max_steps=1, nspo_heldout_fraction=0.5, nspo_probe_tokens=4096),
    )  # fmt: skip
    fit, heldout = trainer.preservation_sequences["fit"], trainer.preservation_sequences["heldout"]
    assert heldout and fit and not {tuple(s) for s in fit} & {tuple(s) for s in heldout}
    reference = load_reference(tiny_model_dir)
    layer = trainer.protected_layers[0].name
    group = trainer.projector.groups[layer]
    for split, sequences, other in (("heldout", heldout, fit), ("fit", fit, heldout)):
        rows = trainer.projector.probes[split][group].double()
        own = capture_inputs(reference, sequences, [layer], tokenizer.pad_token_id)[layer]
        others = capture_inputs(reference, other, [layer], tokenizer.pad_token_id)[layer]
        distance_own = torch.cdist(rows, own).min(-1).values
        distance_other = torch.cdist(rows, others).min(-1).values
        # every probe row is an input of its own split; most are no input of the other split (the shared
        # chat-template opening gives equal rows at equal positions, so not all)
        assert distance_own.max() < 1e-5 and (distance_other > 1e-3).float().mean() > 0.5, split


def test_protected_biases_are_frozen_and_unchanged(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path, max_steps=3, nspo_target_modules=["attention"]),
    )  # fmt: skip
    biased = [layer for layer in trainer.protected_layers if layer.linear.bias is not None]
    assert biased, "the tiny Qwen2 model has q/k/v biases"
    before = {layer.name: layer.linear.bias.detach().clone() for layer in biased}
    assert not any(layer.linear.bias.requires_grad for layer in biased)
    trainer.train()
    for layer in biased:
        assert torch.equal(layer.linear.bias.detach().cpu(), before[layer.name].cpu()), layer.name


@pytest.mark.parametrize(
    ("values", "agrees"),
    [
        ([{"a": 0, "b": 1}] * 3, True),
        ([{"a": 0, "b": 1}, {"a": 1, "b": 1}], False),
        ([{"a": 0}, {"a": 0, "b": 1}], False),
    ],
)
def test_owner_disagreement_between_ranks_is_caught(values, agrees):
    gather = lambda value: values  # noqa: E731  (what all_gather_object would return on each rank)
    if agrees:
        check_agreement(values[0], "group owners", gather)
    else:
        with pytest.raises(RuntimeError, match="group owners differ between ranks"):
            check_agreement(values[0], "group owners", gather)


def test_trainer_checks_that_ranks_agree_on_owners(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, monkeypatch
):
    from nspo_trl.nullspace import sharding

    monkeypatch.setattr(sharding, "all_gather_objects", lambda value: [value, {**value, "other-group": 1}])
    with pytest.raises(RuntimeError, match="group owners differ between ranks"):
        make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, nspo_args(tmp_path, max_steps=1))


def test_grpo_positional_order_is_kept_and_preservation_data_is_keyword_only(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    from transformers import TrainerCallback

    from nspo_trl import NSPOTrainer
    from nspo_trl.rewards import refusal_reward

    class Marker(TrainerCallback):
        pass

    args = nspo_args(tmp_path, max_steps=1)
    # GRPOTrainer's positions: ..., processing_class, reward_processing_classes, callbacks
    trainer = NSPOTrainer(
        tiny_model_dir, refusal_reward, args, safety_prompts, None, tokenizer, None, [Marker()],
        preservation_dataset=preservation_small,
    )  # fmt: skip
    assert any(isinstance(cb, Marker) for cb in trainer.callback_handler.callbacks)
    # in GRPOTrainer's reward_processing_classes slot it is not taken for preservation data
    with pytest.raises(ValueError, match="preservation_dataset: required"):
        NSPOTrainer(tiny_model_dir, refusal_reward, args, safety_prompts, None, tokenizer, preservation_small)


def test_nullspace_exports_its_public_api():
    import nspo_trl.nullspace as nullspace

    for name in nullspace.__all__:
        assert getattr(nullspace, name).__module__.startswith("nspo_trl.nullspace."), name


def test_resume_anchors_to_the_saved_reference_not_to_the_loaded_weights(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    """After a resume, the first projection keeps ``W − W_ref`` in the null space with the checkpoint's ``W_ref``.

    The first run trains without projecting (``nspo_project_every: 0``), so the checkpoint's weights have
    moved off ``W_ref`` outside the null space as well; the resumed run projects. Anchored to the saved
    ``W_ref``, the projection removes that movement (leakage at round-off); anchored to the weights as
    loaded from the checkpoint, it would keep it.
    """
    from safetensors.torch import load_file

    def args(**kw):
        return nspo_args(tmp_path, save_strategy="steps", save_steps=2, **kw)

    first = args(max_steps=2, nspo_project_every=0, nspo_project_gradients=False)
    make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, first).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = load_file(str(checkpoint / "nspo" / "reference-rank00000-of-00001.safetensors"))
    trained = load_file(str(checkpoint / "model.safetensors"))
    reference = load_reference(tiny_model_dir)
    names = [n for n in saved if f"{n}.weight" in trained]
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    # the weights as loaded differ from W_ref, outside the null space too
    assert max(leakage(trained[f"{n}.weight"], saved[n], x[n]) for n in names) > 1e-3

    resumed = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args(max_steps=3))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    layers = {layer.name: layer.linear for layer in resumed.protected_layers}
    for name in names:
        torch.testing.assert_close(saved[name], reference.get_submodule(name).weight, rtol=0, atol=0)
        torch.testing.assert_close(resumed.constrained_update.reference[name], saved[name], rtol=0, atol=0)
        assert leakage(layers[name].weight, saved[name], x[name]) < 1e-5, name


def test_heldout_leakage_is_measured_on_heldout_inputs(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """``nspo/leakage_heldout`` is ``‖X_h ΔWᵀ‖/‖X_h W_refᵀ‖`` with ``X_h`` the held-out examples' inputs.

    The null space is exact on the fit inputs (fit leakage is round-off) and not on held-out ones, so a
    figure computed from the fit inputs would be visibly smaller than the direct computation here.
    """
    trainer = make_trainer(
        tiny_model_dir, tokenizer, safety_prompts, preservation_small,
        nspo_args(tmp_path, max_steps=3, nspo_heldout_fraction=0.5, nspo_probe_tokens=4096),
    )  # fmt: skip
    trainer.train()
    figures = trainer.leakage()
    reference = load_reference(tiny_model_dir)
    heldout = trainer.preservation_sequences["heldout"]
    names = [layer.name for layer in trainer.protected_layers if not layer.is_lora]
    x = capture_inputs(reference, heldout, names, tokenizer.pad_token_id)
    checked = 0
    for layer in trainer.protected_layers:
        if layer.name not in figures["heldout"]:
            continue
        direct = leakage(layer.linear.weight, reference.get_submodule(layer.name).weight, x[layer.name])
        assert figures["heldout"][layer.name] == pytest.approx(direct, rel=1e-4, abs=1e-9), layer.name
        checked += 1
    assert checked
    assert max(figures["heldout"].values()) > 100 * max(figures["fit"].values())
