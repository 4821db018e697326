"""NSPOTrainer on a tiny local model: exactness of the constrained update, end to end."""

from __future__ import annotations

import re

import pytest
import torch
from testing_utils import COMMON, NSPO_COMMON, capture_inputs, leakage, load_reference, make_trainer, nspo_args
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from nspo_trl import NSPOConfig, NSPOTrainer
from nspo_trl.models.tiny_model import build_tiny_model
from nspo_trl.nullspace import NullSpaceAdamW
from nspo_trl.nullspace.build import prompt_sequences
from nspo_trl.rewards import refusal_reward


class LeakageSpy(TrainerCallback):
    """At each step start (before generation, i.e. where TRL syncs vLLM) record the worst layer leakage."""

    def __init__(self, layers, reference, inputs):
        self.layers, self.reference, self.inputs, self.seen = layers, reference, inputs, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step:
            self.seen.append(
                max(leakage(self.layers[n].weight, self.reference[n], self.inputs[n]) for n in self.layers)
            )


def test_mlp_targets_twenty_steps_leak_nothing(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    reference = load_reference(tiny_model_dir)
    names = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    assert len(names) == 6
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    ref_weights = {n: reference.get_submodule(n).weight.detach().clone() for n in names}

    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=20, learning_rate=1e-2),
    )
    layers = {n: trainer.model.get_submodule(n) for n in names}
    spy = LeakageSpy(layers, ref_weights, x)
    trainer.add_callback(spy)
    assert {layer.name for layer in trainer.protected_layers} == set(names)
    assert trainer.projector.summary()["frozen_modules"] == 0
    trainer.train()

    for name in names:
        w = layers[name].weight.detach().cpu()
        change = float((w - ref_weights[name]).norm() / ref_weights[name].norm())
        assert change > 1e-3, f"{name} did not train (relative change {change:.2e})"
        assert leakage(w, ref_weights[name], x[name]) <= 1e-6, name
    # what generation (and a vLLM sync) saw at every step was already projected
    assert len(spy.seen) == 19 and max(spy.seen) <= 1e-6
    # non-target weights moved freely
    q = trainer.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert not torch.equal(q.cpu(), reference.get_submodule("model.layers.0.self_attn.q_proj").weight)
    # the trainer's own metric agrees
    assert max(trainer.leakage()["fit"].values()) <= 1e-6
    logged = [log for log in trainer.state.log_history if "nspo/leakage_fit" in log]
    assert logged and all(log["nspo/leakage_fit"] <= 1e-6 for log in logged)
    # the share of the gradient the null space lets through, overall and for the only protected kind (MLP)
    shares = [log for log in trainer.state.log_history if "nspo/grad_null_fraction" in log]
    assert shares and all(0 < log["nspo/grad_null_fraction"] < 1 for log in shares)
    assert all(log["nspo/grad_null_fraction_mlp"] == log["nspo/grad_null_fraction"] for log in shares)
    assert not any("nspo/grad_null_fraction_attention" in log for log in trainer.state.log_history)


def test_paper_alpha_obeys_its_leakage_bound(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    """α = 5e-5 also admits tiny nonzero eigen-directions: ‖D Xᵀ‖² = Σ_null λ_i ‖D u_i‖² ≤ α·λ_max·‖D‖²."""
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=10, nspo_alpha=5e-5),
    )
    trainer.train()
    reference = load_reference(tiny_model_dir)
    names = [layer.name for layer in trainer.protected_layers]
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    for name in names:
        w_ref = reference.get_submodule(name).weight.detach().double()
        delta = trainer.model.get_submodule(name).weight.detach().cpu().double() - w_ref
        lam_max = float(torch.linalg.eigvalsh(x[name].T @ x[name])[-1])
        bound = (5e-5 * lam_max) ** 0.5 * float(delta.norm()) / float((x[name] @ w_ref.T).norm())
        measured = leakage(w_ref + delta, w_ref, x[name])
        assert measured <= bound * (1 + 1e-6) + 1e-7, (name, measured, bound)
        assert delta.norm() > 0


def test_plain_grpo_leaks_for_contrast(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    """Same run with the projection disabled: the same metric is far from zero (the test can fail)."""
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=20, nspo_project_every=0),
    )
    trainer.train()
    assert max(trainer.leakage()["fit"].values()) > 1e-3


def test_full_preset_keeps_preservation_logits(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=20, nspo_target_modules=["full"], learning_rate=1e-2),
    )
    protected = {layer.name for layer in trainer.protected_layers}
    assert "lm_head" in protected and "model.layers.1.self_attn.k_proj" in protected
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in protected}  # embeddings, norms, biases frozen
    trainer.train()

    reference = load_reference(tiny_model_dir)
    model = trainer.model.eval().cpu()
    changed = [
        n for n in protected if (model.get_submodule(n).weight - reference.get_submodule(n).weight).norm() > 1e-3
    ]
    assert len(changed) >= len(protected) // 2, "the safety reward should move most protected weights"

    max_kl = max_logit = 0.0
    with torch.no_grad():
        for ids in preservation_sequences:
            batch = torch.tensor([ids])
            ref_logp = reference(batch).logits.double().log_softmax(-1)
            new_logp = model(batch).logits.double().log_softmax(-1)
            kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).max()
            max_kl = max(max_kl, float(kl))
            max_logit = max(max_logit, float((ref_logp - new_logp).abs().max()))
    assert max_kl <= 1e-5 and max_logit <= 1e-5, (max_kl, max_logit)


def test_disabled_projection_equals_grpo_trainer(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    nspo = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=6, nspo_project_every=0),
    )
    nspo.train()
    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=refusal_reward,
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=6, **COMMON),
        train_dataset=safety_prompts,
        processing_class=tokenizer,
    )
    grpo.train()
    grpo_params = dict(grpo.model.named_parameters())
    for name, param in nspo.model.named_parameters():
        torch.testing.assert_close(param, grpo_params[name], rtol=0, atol=0, msg=name)
    initial = load_reference(tiny_model_dir)
    assert not torch.equal(initial.lm_head.weight, nspo.model.lm_head.weight.cpu())


@pytest.mark.parametrize("offload", [False, True])
def test_lora_update_stays_in_null_space(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path, offload
):
    from peft import LoraConfig

    reference = load_reference(tiny_model_dir)
    names = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    x = capture_inputs(reference, preservation_sequences, names, tokenizer.pad_token_id)
    peft_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        safety_prompts,
        preservation_small,
        nspo_args(tmp_path, max_steps=12, learning_rate=5e-2, nspo_projector_offload=offload),
        peft_config=peft_config,
    )
    assert {layer.name for layer in trainer.protected_layers} == set(names)  # q_proj adapter stays free
    trainer.train()
    for layer in trainer.protected_layers:
        delta = trainer.constrained_update.weight_delta(layer).cpu()
        base = reference.get_submodule(layer.name).weight
        assert delta.norm() / base.norm() > 1e-4, f"{layer.name}: LoRA did not train"
        assert leakage(base + delta, base, x[layer.name]) <= 1e-6, layer.name


def test_offloaded_projector_lives_in_host_ram_whatever_the_weights_device():
    """nspo_projector_offload keeps the bases on the CPU even when the weights are on an accelerator."""
    from types import SimpleNamespace

    from nspo_trl.nullspace.build import ProjectorBuilder

    layers = [SimpleNamespace(linear=SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda", 3))))]
    for offload, expected in ((True, torch.device("cpu")), (False, torch.device("cuda", 3))):
        builder = ProjectorBuilder(None, None, layers, SimpleNamespace(nspo_projector_offload=offload))
        assert builder.device() == expected


def test_dora_is_rejected(tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["gate_proj"], use_dora=True, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="use_dora"):
        make_trainer(
            tiny_model_dir,
            tokenizer,
            safety_prompts,
            preservation_small,
            nspo_args(tmp_path, max_steps=1),
            peft_config=config,
        )


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


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"nspo_target_modules": ["no_such_layer"]}, "nspo_target_modules"),
        ({"nspo_target_modules": ["(unclosed"]}, "nspo_target_modules"),
        ({"nspo_alpha": 1.5}, "nspo_alpha"),
        ({"nspo_alpha": 0.0}, "nspo_alpha"),
        ({"nspo_heldout_fraction": 1.0}, "nspo_heldout_fraction"),
        ({"nspo_project_every": -1}, "nspo_project_every"),
        ({"nspo_subspace": "contrastive"}, "nspo_subspace"),
        ({"nspo_contrast_budget": 0.0}, "nspo_contrast_budget"),
        ({"nspo_contrast_budget": 1.0}, "nspo_contrast_budget"),
        ({"nspo_subspace": "contrast", "nspo_heldout_fraction": 0.0}, "nspo_heldout_fraction"),
        ({"nspo_contrast_protect_benign": True}, "nspo_contrast_protect_benign"),
        ({"nspo_null_space_adamw": True, "nspo_project_every": 0}, "nspo_null_space_adamw"),
        ({"nspo_untie_word_embeddings": True, "use_vllm": True}, "nspo_untie_word_embeddings"),
        ({"nspo_null_space_adamw": True, "optim": "sgd"}, "nspo_null_space_adamw"),
        ({"nspo_null_space_adamw": True, "optim": "adafactor"}, "nspo_null_space_adamw"),
        ({"nspo_trainable_parameters": ["no_such_parameter"]}, "nspo_trainable_parameters"),
        ({"nspo_trainable_parameters": ["mlp", "(unclosed"]}, "nspo_trainable_parameters"),
        ({"nspo_trainable_parameters": [" "]}, "nspo_trainable_parameters"),
        # under `full` the norms are frozen, so training only them would train nothing
        ({"nspo_trainable_parameters": ["norm"], "nspo_target_modules": ["full"]}, "nspo_trainable_parameters"),
    ],
)
def test_bad_settings_name_their_field(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, overrides, field
):
    with pytest.raises(ValueError, match=field) as info:
        make_trainer(
            tiny_model_dir,
            tokenizer,
            safety_prompts,
            preservation_small,
            nspo_args(tmp_path, max_steps=1, **overrides),
        )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("empty", [False, True])
def test_empty_preservation_set_is_rejected(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path, empty
):
    preservation = preservation_small.select([]) if empty else None
    with pytest.raises(ValueError, match="preservation_dataset"):
        make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation, nspo_args(tmp_path, max_steps=1))


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
