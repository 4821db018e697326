"""What the optimizer does inside the null space: gradient projection, NullSpaceAdamW, the output layer, which
parameters train."""

from __future__ import annotations

import re

import pytest
import torch
from testing_utils import capture_inputs, leakage, load_reference, make_trainer, nspo_args
from transformers import TrainerCallback

from nspo_trl.models.tiny_model import build_tiny_model
from nspo_trl.nullspace import NullSpaceAdamW


class MomentSpy(TrainerCallback):
    """Records, after each optimizer step, how much of Adam's first moment lies outside the null space."""

    def __init__(self, trainer, names):
        self.trainer, self.names, self.outside = trainer, names, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        params = {
            id(p): p for n, p in self.trainer.model.named_parameters() if n.removesuffix(".weight") in self.names
        }
        worst = 0.0
        for group in self.trainer.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in params and "exp_avg" in self.trainer.optimizer.state[p]:
                    m = self.trainer.optimizer.state[p]["exp_avg"].float()
                    name = next(n for n in self.names if self.trainer.model.get_submodule(n).weight is p)
                    outside = m - self.trainer.projector.apply(name, m)
                    worst = max(worst, float(outside.norm() / m.norm()))
        self.outside.append(worst)


@pytest.mark.parametrize("project_gradients", [False, True])
def test_gradient_projection_keeps_adam_moments_in_the_null_space(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path, project_gradients
):
    """With ``nspo_project_gradients`` Adam's first moment never leaves the null space (the paper's Eq. 6);
    with the weight projection alone it does (its moments keep pushing into forbidden directions).
    Either way the weights stay exact."""
    args = nspo_args(tmp_path, max_steps=6, learning_rate=1e-2, nspo_project_gradients=project_gradients)
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args)
    names = [layer.name for layer in trainer.protected_layers]
    spy = MomentSpy(trainer, names)
    trainer.add_callback(spy)
    reference = load_reference(tiny_model_dir)
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    trainer.train()
    assert len(spy.outside) == 6
    if project_gradients:
        assert max(spy.outside) <= 1e-5
    else:
        assert min(spy.outside) >= 0.1
    for name in names:
        w = trainer.model.get_submodule(name).weight
        assert leakage(w, reference.get_submodule(name).weight, x[name]) <= 1e-6, name


class RawLeakageSpy(TrainerCallback):
    """After each optimizer step, before any projection (interval 100), the worst raw layer leakage."""

    def __init__(self, layers, reference, inputs):
        self.layers, self.reference, self.inputs, self.seen = layers, reference, inputs, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append(max(leakage(self.layers[n].weight, self.reference[n], self.inputs[n]) for n in self.layers))


@pytest.mark.parametrize("null_space_adamw", [False, True])
def test_null_space_adamw_steps_need_no_projection(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path, null_space_adamw
):
    """``nspo_null_space_adamw``: the trainer's optimizer is AdamW on null-space coordinates, so the raw weights
    after every step, before any projection, already leak nothing; AdamW's raw steps leak (the projection then
    throws that part away). Its moments are ``(out, k)``."""
    args = nspo_args(
        tmp_path, max_steps=4, learning_rate=1e-2, nspo_project_every=100, nspo_null_space_adamw=null_space_adamw
    )
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args)
    names = [layer.name for layer in trainer.protected_layers]
    reference = load_reference(tiny_model_dir)
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    layers = {n: trainer.model.get_submodule(n) for n in names}
    spy = RawLeakageSpy(layers, {n: reference.get_submodule(n).weight for n in names}, x)
    trainer.add_callback(spy)
    trainer.train()
    assert len(spy.seen) == 4
    optimizer = trainer.optimizer.optimizer  # under accelerate's AcceleratedOptimizer
    if null_space_adamw:
        assert isinstance(optimizer, NullSpaceAdamW)
        assert max(spy.seen) <= 1e-6
        for name, layer in layers.items():
            k = trainer.projector.factor_for(name).null_dim
            assert optimizer.state[layer.weight]["exp_avg"].shape == (layer.out_features, k)
    else:
        assert not isinstance(optimizer, NullSpaceAdamW)
        assert min(spy.seen) >= 1e-3
    for name, layer in layers.items():
        assert leakage(layer.weight, reference.get_submodule(name).weight, x[name]) <= 1e-6, name
        assert (layer.weight - reference.get_submodule(name).weight).norm() > 0, name


def test_null_space_adamw_refuses_an_optimizer_passed_in(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    model = load_reference(tiny_model_dir)
    with pytest.raises(ValueError, match="nspo_null_space_adamw") as info:
        make_trainer(
            model,
            tokenizer,
            safety_prompts,
            preservation_small,
            nspo_args(tmp_path, max_steps=1, nspo_null_space_adamw=True),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    assert "\n" not in str(info.value)


def test_untied_output_layer_trains_inside_its_own_null_space(
    tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    """``nspo_untie_word_embeddings`` under ``full``: a tied ``lm_head`` gets its own copy, protected by the null
    space of the final hidden states; it moves, leaks nothing, the embeddings stay put, and a reload keeps the
    two apart."""
    from transformers import AutoModelForCausalLM

    model_dir = str(
        build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    )
    reference = load_reference(model_dir)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    args = nspo_args(
        tmp_path, max_steps=6, learning_rate=1e-2, nspo_target_modules=["full"], nspo_untie_word_embeddings=True
    )
    trainer = make_trainer(model_dir, tokenizer, safety_prompts, preservation_small, args)
    assert "lm_head" in {layer.name for layer in trainer.protected_layers}
    x = capture_inputs(reference, preservation_sequences, ["lm_head"], tokenizer.pad_token_id)["lm_head"]
    trainer.train()
    head, embeddings = trainer.model.lm_head.weight, trainer.model.model.embed_tokens.weight
    torch.testing.assert_close(embeddings, reference.model.embed_tokens.weight, rtol=0, atol=0)
    assert (head - reference.lm_head.weight).norm() > 1e-3
    assert leakage(head, reference.lm_head.weight, x) <= 1e-6
    vocab, hidden = head.shape
    assert (
        trainer.card_details["output layer"]
        == f"untied from the input embeddings (+{vocab * hidden / 1e6:.1f}M parameters)"
    )
    trainer.save_model()
    reloaded = load_reference(args.output_dir)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, head.detach(), rtol=0, atol=0)
    assert AutoModelForCausalLM.from_pretrained(args.output_dir).config.tie_word_embeddings is False


def test_untying_an_untied_model_changes_nothing(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    args = nspo_args(tmp_path, max_steps=1, nspo_target_modules=["full"], nspo_untie_word_embeddings=True)
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args)
    assert "output layer" not in trainer.card_details
    assert sum(p.numel() for p in trainer.model.parameters()) == sum(
        p.numel() for p in load_reference(tiny_model_dir).parameters()
    )


def test_untying_is_refused_under_peft(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path):
    from peft import LoraConfig

    with pytest.raises(NotImplementedError, match="nspo_untie_word_embeddings") as info:
        make_trainer(
            tiny_model_dir,
            tokenizer,
            safety_prompts,
            preservation_small,
            nspo_args(tmp_path, max_steps=1, nspo_untie_word_embeddings=True),
            peft_config=LoraConfig(r=4, target_modules=["gate_proj"], task_type="CAUSAL_LM"),
        )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("tied", "patterns"),
    [(False, ["norm"]), (False, [r"\.mlp\.", "self_attn.o_proj"]), (True, ["lm_head"]), (False, ["lm_head"])],
)
def test_trainable_parameters_train_exactly_the_matched_ones(
    tied, patterns, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """Plain GRPO on a subset of the parameters (the ablations of where refusal is learned): every parameter a
    pattern matches moves, no other one does. A tied ``lm_head`` is matched by its own name too, and trains the
    shared embedding matrix."""
    model_dir = str(
        build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128, tie_word_embeddings=tied)
    )
    before = {name: p.detach().clone() for name, p in load_reference(model_dir).named_parameters()}
    args = nspo_args(tmp_path, max_steps=3, nspo_project_every=0, nspo_trainable_parameters=patterns)
    trainer = make_trainer(model_dir, tokenizer, safety_prompts, preservation_small, args)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    names = {n for n, _ in trainer.model.named_parameters(remove_duplicate=False)}
    matched = {n for n in before if any(re.search(p, n) for p in patterns)}
    if tied:
        assert "lm_head.weight" in names and not matched  # the tied matrix is listed once, as the embedding
        matched = {"model.embed_tokens.weight"}
    moved = {n for n in before if not torch.equal(before[n], after[n].detach().cpu())}
    assert moved == matched
