"""Training-step overhead of NSPO: ``NSPOTrainer`` vs ``GRPOTrainer``, same model, data, seed and config.

Runs alternate (GRPO, NSPO, GRPO, NSPO, ...) so drift in machine load hits both alike. A callback
times every step from ``on_step_begin`` to ``on_step_end`` (generation, reward, loss, backward,
optimizer step and, for NSPO, the projection and its leakage logging); the first steps of each run
are warm-up and dropped. Prints the median step time of each and the ratio NSPO/GRPO last, and records
them as one row of ``results/step_overhead.md`` (keyed by command and device).

    python benchmarks/step_overhead.py                                   # smoke-sized model, CPU, ~2 min
    python benchmarks/step_overhead.py --batch 8 --completion 16          # the smoke recipe's step size
    python benchmarks/step_overhead.py --hidden 1024 --intermediate 4096 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from results_table import command, device_name, record
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from nspo_trl import NSPOConfig, NSPOTrainer
from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.models.tiny_model import build_tiny_model
from nspo_trl.rewards import refusal_reward


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def run(kind: str, model_dir: str, out: str, options, prompts, preservation, tokenizer) -> list[float]:
    common = dict(
        output_dir=out, max_steps=options.steps, per_device_train_batch_size=options.batch, num_generations=4,
        max_completion_length=options.completion, learning_rate=1e-3, logging_steps=5, report_to="none",
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, seed=0, beta=0.0,
        gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    timer = StepTimer()
    if kind == "grpo":
        trainer = GRPOTrainer(model=model_dir, reward_funcs=refusal_reward, args=GRPOConfig(**common),
                              train_dataset=prompts, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    else:
        args = NSPOConfig(**common, nspo_num_preservation_samples=12, nspo_preservation_max_length=16,
                          nspo_heldout_fraction=0.25)  # fmt: skip
        trainer = NSPOTrainer(
            model=model_dir, reward_funcs=refusal_reward, args=args, train_dataset=prompts,
            processing_class=tokenizer, preservation_dataset=preservation, callbacks=[timer],
        )  # fmt: skip
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--completion", type=int, default=32, help="max completion tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(f"{tmp}/model", hidden_size=args.hidden, intermediate_size=args.intermediate))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = load_named_dataset("nspo_trl:safety_prompts")
        preservation = load_named_dataset("nspo_trl:preservation")
        times: dict[str, list[float]] = {"grpo": [], "nspo": []}
        for round_index in range(args.rounds):
            for kind in ("grpo", "nspo"):
                out = f"{tmp}/{kind}{round_index}"
                times[kind] += run(kind, model_dir, out, args, prompts, preservation, tokenizer)[args.warmup :]
    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    print(f"model hidden {args.hidden}, intermediate {args.intermediate}; {args.batch} completions of <= "
          f"{args.completion} tokens per step; {device}; torch {torch.__version__}")  # fmt: skip
    print(f"{args.rounds} interleaved rounds x {args.steps} steps, first {args.warmup} of each run dropped")
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    for kind, values in times.items():
        print(f"{kind}: median {medians[kind] * 1e3:7.1f} ms/step over {len(values)} steps")
    ratio = medians["nspo"] / medians["grpo"]
    print(f"ratio NSPO/GRPO median step time: {ratio:.3f}")
    row = {
        "command": command(),
        "device": device,
        "step": f"{args.batch} completions ≤ {args.completion} tokens",
        "GRPO ms/step": f"{medians['grpo'] * 1e3:.1f}",
        "NSPO ms/step": f"{medians['nspo'] * 1e3:.1f}",
        "NSPO/GRPO": f"**{ratio:.3f}**",
    }
    print(f"recorded in {record('step_overhead', row, key=('command', 'device'))}")


if __name__ == "__main__":
    main()
