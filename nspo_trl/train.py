"""Train with NSPO from a YAML recipe.

    python -m nspo_trl.train                       # the CPU smoke recipe (tiny local model, bundled data)
    python -m nspo_trl.train recipes/smoke.yaml --max_steps 10
    accelerate launch --config_file accelerate_configs/<cfg>.yaml -m nspo_trl.train recipes/<recipe>.yaml

The recipe is parsed by TRL's ``TrlParser`` into ``NSPOScriptArguments``, [`NSPOConfig`] and
``ModelConfig``; any field can be overridden on the command line (``--nspo_alpha 1e-4``).
At the end it writes the model, ``nspo_projector/`` and ``nspo_summary.json`` (reward and
leakage) to ``output_dir``.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from nspo_trl.config import NSPOConfig
from nspo_trl.data import load_named_dataset
from nspo_trl.rewards import refusal_reward
from nspo_trl.tiny_model import build_tiny_model
from nspo_trl.trainer import NSPOTrainer

logger = logging.getLogger("nspo_trl.train")

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
REWARD_FUNCS = {"refusal": refusal_reward}
SUMMARY_FILE = "nspo_summary.json"


@dataclass
class NSPOScriptArguments(ScriptArguments):
    """Data, reward and model-building arguments of ``nspo_trl.train`` (on top of TRL's ``ScriptArguments``)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["refusal"],
        metadata={"help": f"Reward functions: {sorted(REWARD_FUNCS)} or dotted paths 'module.function'."},
    )
    harmful_only: bool = field(
        default=False, metadata={"help": "Keep only training prompts whose 'is_harmful' column is true."}
    )
    preservation_dataset_name: str | None = field(
        default=None, metadata={"help": "General-task data for the null space (Hub id, local file, nspo_trl:<name>)."}
    )
    preservation_dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    preservation_dataset_split: str = field(default="train", metadata={"help": "Its split."})
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "Build a tiny random Qwen2 model + tokenizer at model_name_or_path if none is there."},
    )
    tiny_hidden_size: int = field(default=256, metadata={"help": "Hidden size of the tiny model."})
    tiny_intermediate_size: int = field(default=512, metadata={"help": "MLP width of the tiny model."})


def resolve_reward(name: str):
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, _, attribute = name.rpartition(".")
    if not module_name:
        raise ValueError(f"reward_funcs: {name!r} is neither one of {sorted(REWARD_FUNCS)} nor 'module.function'.")
    sys.path.insert(0, str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_funcs: cannot import {name!r} ({err}).") from None
    finally:
        sys.path.pop(0)


def summarize(trainer: NSPOTrainer, wall_time: float) -> dict:
    """Reward at the start and end of training, leakage per layer, and the projector's statistics."""
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    window = max(1, len(rewards) // 4)
    leakage = trainer.leakage()
    return {
        "wall_time_s": round(wall_time, 2),
        "steps": trainer.state.global_step,
        "reward_first": sum(rewards[:window]) / window if rewards else None,
        "reward_last": sum(rewards[-window:]) / window if rewards else None,
        "leakage": {split: max(values.values()) for split, values in leakage.items() if values},
        "leakage_per_layer": leakage,
        "projector": trainer.projector.summary(),
        "projector_layers": trainer.projector.stats(),
    }


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NSPO projector (per input group)")
    for column in ("group", "in", "null dim", "stored", "null λ/λmax", "modules"):
        table.add_column(column)
    for group, stats in summary["projector_layers"].items():
        rel = stats["null_lambda_rel"]
        table.add_row(
            group,
            str(stats["in_features"]),
            str(stats["null_dim"]),
            f"{stats['stored']}:{stats['stored_dim']}",
            "-" if rel is None else f"{rel:.1e}",
            str(len(stats["modules"])),
        )
    console = Console()
    console.print(table)
    leak = ", ".join(f"{split} {value:.2e}" for split, value in summary["leakage"].items())
    console.print(
        f"steps {summary['steps']} in {summary['wall_time_s']} s | reward {summary['reward_first']:.3f} -> "
        f"{summary['reward_last']:.3f} | max leakage ‖ΔW X‖/‖W_ref X‖: {leak}"
    )


def main(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    model_path = model_args.model_name_or_path
    if not model_path:
        raise ValueError("model_name_or_path: required (a Hub id or a local directory).")
    if script_args.build_tiny_model:
        with training_args.main_process_first(desc="build tiny model"):
            if not (Path(model_path) / "config.json").is_file():
                build_tiny_model(
                    model_path,
                    hidden_size=script_args.tiny_hidden_size,
                    intermediate_size=script_args.tiny_intermediate_size,
                    seed=training_args.seed,
                )
    if not script_args.dataset_name:
        raise ValueError("dataset_name: required (prompts to train on).")
    if not script_args.preservation_dataset_name:
        raise ValueError("preservation_dataset_name: required (general-task data whose behaviour NSPO preserves).")

    model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    train_dataset = load_named_dataset(
        script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config
    )
    if script_args.harmful_only:
        if "is_harmful" not in train_dataset.column_names:
            raise ValueError(f"harmful_only: {script_args.dataset_name} has no 'is_harmful' column.")
        train_dataset = train_dataset.filter(lambda example: bool(example["is_harmful"]))
    preservation = load_named_dataset(
        script_args.preservation_dataset_name,
        script_args.preservation_dataset_split,
        script_args.preservation_dataset_config,
    )
    trainer = NSPOTrainer(
        model=model_path,
        reward_funcs=[resolve_reward(name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        preservation_dataset=preservation,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    summary = summarize(trainer, time.time() - start)
    if trainer.accelerator.is_main_process:
        (Path(training_args.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return summary


def make_parser() -> TrlParser:
    return TrlParser((NSPOScriptArguments, NSPOConfig, ModelConfig))


def parse(argv: list[str]) -> tuple[NSPOScriptArguments, NSPOConfig, ModelConfig]:
    """A leading ``*.yaml`` path is the recipe (``--config``); no recipe at all means the smoke recipe."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0], *argv[1:]]
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    recipe = Path(argv[argv.index("--config") + 1])
    if not recipe.is_file():
        raise ValueError(f"recipe: {recipe} does not exist.")
    return make_parser().parse_args_and_config(args=argv)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        script_args, training_args, model_args = parse(sys.argv[1:] if argv is None else argv)
        main(script_args, training_args, model_args)
    except ValueError as err:
        print(f"nspo_trl.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
