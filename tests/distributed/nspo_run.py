"""Ten NSPO steps on the tiny model with rollouts that do not depend on the number of ranks.

Launched as a plain script (one process) or by ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3);
``test_distributed.py`` compares the results. Rank 0 writes ``final.safetensors`` (every module
parameter, gathered) and, under DeepSpeed, ``master.safetensors`` (the optimizer's fp32 master of
every protected weight), plus ``result.json`` (world size, backend, the trainer's leakage, and each
rank's peak bytes of covariance held while the projector was built, measured by an instrumented
collector).

Rollouts: TRL samples with each rank's own RNG stream, so a 2-rank run would see other
completions than a 1-rank run. Here sampling is Gumbel-max with noise seeded by a hash of the
row's unpadded tokens and its index within its group, so completion ``j`` of a prompt is the same
token sequence whichever rank generates it (the local batch holds whole groups).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from nspo_trl import NSPOConfig, NSPOTrainer
from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.nullspace import collect
from nspo_trl.nullspace.access import gathered
from nspo_trl.nullspace.sharding import all_gather_objects

NUM_GENERATIONS = 4
GLOBAL_BATCH = 8  # two prompts × four completions per step, whatever the number of ranks
LORA_RANK, LORA_ALPHA = 4, 8


class HashedGumbel(LogitsProcessor):
    """``scores + g`` with Gumbel noise ``g`` seeded by (unpadded tokens so far, index in group)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        noise = torch.empty_like(scores)
        for row, tokens in enumerate(input_ids.tolist()):
            start = next((i for i, t in enumerate(tokens) if t != self.pad_token_id), len(tokens))
            key = hashlib.sha256(repr((tokens[start:], row % NUM_GENERATIONS)).encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
            uniform = torch.rand(scores.shape[-1], generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            noise[row] = (-torch.log(-torch.log(uniform))).to(scores.dtype)
        return scores + noise


def length_reward(completions, **kwargs) -> list[float]:
    """Characters in the completion / 10: deterministic, and it varies within a group."""
    return [len(c[-1]["content"] if isinstance(c, list) else c) / 10 for c in completions]


class CovarianceMeter:
    """This rank's peak bytes of covariance held at once, over every collector of the build.

    Measured after each accumulation and after each reduction to the owners (where non-owners drop theirs).
    """

    def __init__(self) -> None:
        self.live: list[collect.CovarianceCollector] = []
        self.peak = 0
        accumulate, reduce = collect.CovarianceCollector._accumulate, collect.CovarianceCollector.reduce_to_owners
        meter = self

        def metered_accumulate(collector, name, x):
            accumulate(collector, name, x)
            meter.measure(collector)

        def metered_reduce(collector, owners):
            reduce(collector, owners)
            meter.measure(collector)

        collect.CovarianceCollector._accumulate = metered_accumulate
        collect.CovarianceCollector.reduce_to_owners = metered_reduce

    def measure(self, collector: collect.CovarianceCollector) -> None:
        if collector not in self.live:
            self.live.append(collector)
        held = sum(c.element_size() * c.numel() for col in self.live for c in col.covariances.values())
        self.peak = max(self.peak, held)


def lora_config():
    from peft import LoraConfig

    targets = ["gate_proj", "up_proj", "down_proj"]
    return LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", action="store_true", help="checkpoint at the last step (NSPO state per rank)")
    parser.add_argument("--lora", action="store_true", help=f"train LoRA adapters (r={LORA_RANK}) on the MLP")
    parser.add_argument("--build-memory-gb", type=float, default=8.0, help="nspo_build_memory_gb")
    cli = parser.parse_args()
    meter = CovarianceMeter()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    args = NSPOConfig(
        output_dir=cli.output,
        max_steps=cli.steps,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        num_generations=NUM_GENERATIONS,
        max_completion_length=8,
        learning_rate=5e-2 if cli.lora else 1e-2,
        # Adam divides by √v: a gradient entry that is round-off (≈1e-10, reduced in another order on 2
        # ranks) would take a full-size step with ε = 1e-8. ε = 1e-4 keeps such entries' steps ≈ lr·g/ε.
        adam_epsilon=1e-4,
        logging_steps=5,
        report_to="none",
        save_strategy="steps" if cli.save else "no",
        save_steps=cli.steps,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=0,
        beta=0.0,
        generation_kwargs={"do_sample": False, "temperature": None, "top_p": None, "top_k": None},
        nspo_target_modules=["mlp"],
        nspo_alpha=1e-10,
        nspo_preservation_max_length=14,
        nspo_heldout_fraction=0.0,
        # 3 examples one per batch: rank 0 runs 2 forwards, rank 1 one and an idle one (ZeRO-3 gathers in step)
        nspo_preservation_batch_size=1,
        nspo_build_memory_gb=cli.build_memory_gb,
    )
    trainer = NSPOTrainer(
        model=cli.model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=load_named_dataset("nspo_trl:safety_prompts").shuffle(seed=0),
        processing_class=tokenizer,
        preservation_dataset=load_named_dataset("nspo_trl:preservation").select(range(3)),
        peft_config=lora_config() if cli.lora else None,
    )
    model = trainer.model
    generate = model.generate
    processors = LogitsProcessorList([HashedGumbel(tokenizer.pad_token_id)])
    model.generate = lambda *a, **kw: generate(*a, logits_processor=processors, **kw)
    trainer.train()
    weight = trainer.protected_layers[0].linear.weight
    persistent = getattr(weight, "ds_persist", None)  # ZeRO-3: kept whole on every rank during steps

    leakage = trainer.leakage()
    build_peaks = all_gather_objects(meter.peak)
    main_process = trainer.accelerator.is_main_process
    final: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            if main_process:
                final[name] = param.detach().cpu().clone()
    master: dict[str, torch.Tensor] = {}
    if trainer.is_deepspeed_enabled and not cli.lora:
        from deepspeed.utils import safe_get_full_fp32_param

        for layer in trainer.protected_layers:
            value = safe_get_full_fp32_param(layer.linear.weight)  # collective
            if main_process:
                master[layer.name] = value.detach().cpu().clone()
    if main_process:
        out = Path(cli.output)
        save_file(final, str(out / "final.safetensors"))
        if master:
            save_file(master, str(out / "master.safetensors"))
        result = {
            "world_size": trainer.accelerator.num_processes,
            "deepspeed": trainer.is_deepspeed_enabled,
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.is_deepspeed_enabled
            else None,
            "persistent": persistent,
            "leakage": leakage,
            "owners": trainer.projector.owners,
            "build_peak_bytes": build_peaks,
            "rewards": [e["reward"] for e in trainer.state.log_history if "reward" in e],
        }
        (out / "result.json").write_text(json.dumps(result, indent=2))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
