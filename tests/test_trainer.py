"""NSPOTrainer's guarantees: outputs on preservation inputs do not move, and what is refused."""

from __future__ import annotations

import pytest
import torch
from testing_utils import COMMON, capture_inputs, leakage, load_reference, make_trainer, nspo_args
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

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
