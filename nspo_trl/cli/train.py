"""Train with NSPO from a YAML recipe.

    python -m nspo_trl.train                       # the CPU smoke recipe (tiny local model, bundled data)
    python -m nspo_trl.train recipes/smoke.yaml --max_steps 10
    python -m nspo_trl.train recipes/qwen7b.yaml --dry-run   # check the recipe, print config + memory, load nothing
    accelerate launch --config_file accelerate_configs/<cfg>.yaml -m nspo_trl.train recipes/<recipe>.yaml

The recipe is parsed by TRL's ``TrlParser`` into ``NSPOScriptArguments``, [`NSPOConfig`] and
``ModelConfig``; any field can be overridden on the command line (``--nspo_alpha 1e-4``).
At the end it writes the model, ``nspo_projector/`` and ``nspo_summary.json`` (reward and
leakage) to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, get_peft_config
from trl.import_utils import is_vllm_available

from nspo_trl.cli.arguments import JUDGES, LEARNED_JUDGE, REWARD_FUNCS, NSPOScriptArguments, parse
from nspo_trl.data.named_sets import (
    generate_preservation_responses,
    is_pku_saferlhf,
    load_named_dataset,
    pku_saferlhf_prompts,
    preservation_pairs,
    rebalance,
    seeded_subset,
)
from nspo_trl.data.preservation import check_layout
from nspo_trl.eval.tax import HeldoutSummary
from nspo_trl.models.model_source import resolve_model_path
from nspo_trl.models.tiny_model import build_tiny_model
from nspo_trl.planning.plan import plan_report, print_plan
from nspo_trl.rewards import (
    JudgeError,
    LearnedJudgeReward,
    LlamaGuardReward,
    LocalGuardReward,
)
from nspo_trl.trainer.nspo_config import NSPOConfig
from nspo_trl.trainer.nspo_trainer import NSPOTrainer
from nspo_trl.utils import (
    cache_dir,
    check_versions,
    free_master_port,
    import_object,
    plain_output_when_piped,
    quiet_command_line,
)

logger = logging.getLogger("nspo_trl.train")

SUMMARY_FILE = "nspo_summary.json"


def resolve_reward(name: str, script_args: NSPOScriptArguments):
    if name == "llama_guard":
        api_key = os.environ.get(script_args.judge_api_key_env) if script_args.judge_api_key_env else None
        return LlamaGuardReward(
            script_args.judge_base_url,
            script_args.judge_model,
            api_key=api_key,
            timeout=script_args.judge_timeout,
            max_retries=script_args.judge_max_retries,
            max_concurrency=script_args.judge_max_concurrency,
        )
    if name == "local_guard":
        return LocalGuardReward(script_args.judge_model, mode=script_args.judge_mode or "probability")
    if name == LEARNED_JUDGE:
        return LearnedJudgeReward(mode=script_args.judge_mode or "threshold")
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    return import_object(name, "reward_funcs")


def load_training_prompts(script_args: NSPOScriptArguments, seed: int):
    """Training prompts; PKU-SafeRLHF is recognised by its columns and reduced to unique prompts."""
    dataset = load_named_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"dataset_name: {script_args.dataset_name} has no 'prompt' column (columns: {dataset.column_names}); "
            "name the column of prompts 'prompt'."
        )
    rule_based = [name for name in script_args.reward_funcs if name in REWARD_FUNCS]
    if rule_based and not is_pku_saferlhf(dataset) and "is_harmful" not in dataset.column_names:
        raise ValueError(
            f"reward_funcs: {rule_based[0]} needs an 'is_harmful' column, which {script_args.dataset_name} lacks."
        )
    if is_pku_saferlhf(dataset):
        dataset = pku_saferlhf_prompts(dataset, script_args.train_fraction, seed, script_args.harmful_only)
    else:
        if script_args.train_fraction != 1.0:
            raise ValueError(
                "train_fraction: only applies to PKU-SafeRLHF data; slice other data sets with a split like "
                "train[:40%]."
            )
        if script_args.harmful_only:
            require_harm_labels(dataset, "harmful_only", script_args.dataset_name)
            dataset = dataset.filter(lambda example: bool(example["is_harmful"]))
    if script_args.harmful_fraction is not None:
        require_harm_labels(dataset, "harmful_fraction", script_args.dataset_name)
        dataset = rebalance(dataset, script_args.harmful_fraction, seed)
    return dataset


def require_harm_labels(dataset, field: str, name: str) -> None:
    """Raise a one-line error naming ``field`` when ``dataset`` has no ``is_harmful`` column."""
    if "is_harmful" not in dataset.column_names:
        raise ValueError(f"{field}: {name} has no 'is_harmful' column.")


def load_preservation(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_path: str):
    """Preservation conversations: as stored, mapped from prompt/response columns, or answered by the model.

    Generation only answers the seeded subset the trainer keeps (``nspo_num_preservation_samples``).
    """
    dataset = load_named_dataset(
        script_args.preservation_dataset_name,
        script_args.preservation_dataset_split,
        script_args.preservation_dataset_config,
        field="preservation_dataset_name",
    )
    if script_args.generate_preservation_responses:
        column = script_args.preservation_prompt_column or "prompt"
        if column not in dataset.column_names:
            raise ValueError(f"preservation_prompt_column: {column!r} is not a column of the preservation data.")
        dataset = seeded_subset(dataset, training_args.nspo_num_preservation_samples, training_args.seed)
        return cached_preservation_responses(
            list(dataset[column]), model_path, script_args.preservation_max_new_tokens
        )
    if script_args.preservation_prompt_column or script_args.preservation_response_column:
        if not (script_args.preservation_prompt_column and script_args.preservation_response_column):
            raise ValueError("preservation_response_column: set both the prompt and the response column.")
        return preservation_pairs(
            dataset,
            script_args.preservation_prompt_column,
            script_args.preservation_response_column,
            script_args.preservation_input_column,
        )
    return dataset


def cached_preservation_responses(prompts: list, model_path: str, max_new_tokens: int):
    """[`generate_preservation_responses`], cached under ``cache_dir()/preservation`` by a digest of the
    model's files, the prompts and the length, so repeated runs of a recipe answer once."""
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    key = hashlib.sha256(json.dumps([model_path, max_new_tokens, prompts], sort_keys=True).encode())
    for path in weights:
        stat = path.stat()
        key.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cached = cache_dir() / "preservation" / f"{key.hexdigest()[:24]}.jsonl"
    if cached.is_file():
        return Dataset.from_json(str(cached))
    dataset = generate_preservation_responses(prompts, model_path, max_new_tokens)
    if weights:  # a model without local files (a bare Hub id) has no stable key: do not cache
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_suffix(f".tmp-{os.getpid()}")
        dataset.to_json(str(staging))
        os.replace(staging, cached)
    return dataset


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


SUMMARY_WIDTH = 80
HELDOUT_EXTRA_LABELS = {
    "learned_unsafe": "unsafe (learned judge)",
    "learned_overrefusal": "over-refusal (learned judge)",
    "capability": "capability (exact match)",
}
LEAKAGE_MEANING = {
    "fit": "on the examples the projector was built from",
    "heldout": "on preservation examples it never saw",
}


def short_group(name: str, width: int) -> str:
    """``model.layers.0.mlp.down_proj`` as ``layers.0.mlp.down_proj``, cut from the left to ``width``."""
    name = name.removeprefix("model.")
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def summary_lines(summary: dict) -> list[str]:
    """The end-of-run summary as plain lines of at most 80 columns (a terminal or a log file alike).

    The status keeps one form (``steps … | reward … | max leakage …: fit …, heldout …``, over two lines);
    the lines after it say in words what the leakage figures measure and what range to expect.
    """
    columns = ("in", "null", "stored", "null λ/λmax", "modules")
    widths = (6, 6, 10, 11, 7)
    name_width = SUMMARY_WIDTH - sum(widths) - len(widths)
    lines = ["NSPO projector, per input group (null: the dimensions the update may use)"]
    lines.append(f"{'group':<{name_width}}" + "".join(f" {c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for group, stats in summary["projector_layers"].items():
        rel = stats["null_lambda_rel"]
        cells = (stats["in_features"], stats["null_dim"], f"{stats['stored']}:{stats['stored_dim']}",
                 "-" if rel is None else f"{rel:.1e}", len(stats["modules"]))  # fmt: skip
        row = f"{short_group(group, name_width):<{name_width}}"
        lines.append(row + "".join(f" {c!s:>{w}}" for c, w in zip(cells, widths, strict=True)))
    leak = ", ".join(f"{split} {value:.2e}" for split, value in summary["leakage"].items())
    line = (
        f"steps {summary['steps']} in {summary['wall_time_s']} s | reward {summary['reward_first']:.3f} -> "
        f"{summary['reward_last']:.3f} | max leakage ‖ΔW X‖/‖W_ref X‖: {leak}"
    )
    if held := summary.get("heldout"):
        line += (
            f" | held-out harmful refused {held['heldout_refusal_before']:.2f} -> {held['heldout_refusal_after']:.2f}"
            f" (strict judge {held['heldout_declined_before']:.2f} -> {held['heldout_declined_after']:.2f})"
            f" | general KL {held['general_kl_mean']:.2e}"
        )
        for key, label in HELDOUT_EXTRA_LABELS.items():
            if f"{key}_before" in held:
                line += f" | {label} {held[f'{key}_before']:.2f} -> {held[f'{key}_after']:.2f}"
    head, _, tail = line.partition(" ‖ΔW X‖/‖W_ref X‖: ")
    first, *rest = tail.split(" | ")  # one figure per line, each within 80 columns
    lines += [head + " ‖ΔW X‖/‖W_ref X‖:", "  " + first, *("  | " + part for part in rest)]
    lines.append("What the leakage figures mean (the largest over protected layers):")
    for split, value in summary["leakage"].items():
        lines.append(f"  {split} {value:.1e}: {LEAKAGE_MEANING.get(split, split)},")
        lines.append(f"    the protected layers' outputs moved by {100 * value:.3g} % of their size (0 = untouched).")
    if "fit" in summary["leakage"]:
        lines.append("  fit is ~0 for an exact null space and bounded by nspo_alpha otherwise. heldout")
        lines.append("  says how far that carries to new inputs: 1e-4 to 5e-3 on SmolLM2-135M with")
        lines.append("  200 preservation examples; the smoke recipe's random 1.5M-parameter model with")
        lines.append("  9 examples is a pipeline check, where values near or above 1 are expected.")
    return lines


def print_summary(summary: dict) -> None:
    print("\n".join(summary_lines(summary)), flush=True)


def prepare_model(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> str:
    """The local path to load: the tiny model built on first use, or the resolved Hub id (see ``model_source``)."""
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
    else:
        with training_args.main_process_first(desc="resolve model"):
            model_path = resolve_model_path(model_path)
    check_model_config(model_path)
    return model_path


def check_model_config(model_path: str) -> None:
    """A local model folder's ``config.json`` must parse: a one-line error naming it, not a loader traceback."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return  # a Hub id that the loaders resolve themselves
    try:
        AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:160]
        raise ValueError(
            f"model_name_or_path: {config} cannot be read ({reason}); restore or re-download it."
        ) from None


def model_init_kwargs(training_args: NSPOConfig, model_args: ModelConfig) -> dict:
    """How the model is loaded (``from_pretrained`` keywords): the recipe's revision, dtype and attention, then
    its own ``model_init_kwargs``. The trainer and ``nspo-trl projector build`` load it the same way, so their
    projectors have the same fingerprint."""
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return {**kwargs, **(training_args.model_init_kwargs or {})}


def load_recipe_data(
    script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig
) -> tuple[Dataset, str, Dataset]:
    """A recipe's training prompts, its model's local path and its preservation data, each checked before the
    next is loaded (the trainer and ``nspo-trl projector build`` start from the same)."""
    if not script_args.dataset_name:
        raise ValueError("dataset_name: required (prompts to train on).")
    if not script_args.preservation_dataset_name:
        raise ValueError("preservation_dataset_name: required (general-task data whose behaviour NSPO preserves).")
    train_dataset = load_training_prompts(script_args, training_args.seed)  # checked before anything is built
    model_path = prepare_model(script_args, training_args, model_args)
    preservation = load_preservation(script_args, training_args, model_path)
    check_layout(preservation, "preservation_dataset_name")  # every row, before the trainer writes anything
    return train_dataset, model_path, preservation


def build_trainer(
    script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig, callbacks=None
) -> NSPOTrainer:
    """The [`NSPOTrainer`] a recipe describes: model, tokenizer, training prompts, rewards, preservation data."""
    if training_args.use_vllm and not is_vllm_available():
        raise ValueError("use_vllm: vLLM is not installed; pip install 'nspo_trl[vllm]', or set use_vllm: false.")
    train_dataset, model_path, preservation = load_recipe_data(script_args, training_args, model_args)
    training_args.model_init_kwargs = model_init_kwargs(training_args, model_args)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    trainer = NSPOTrainer(
        model=model_path,
        reward_funcs=[resolve_reward(name, script_args) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        preservation_dataset=preservation,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    trainer.card_details.update(card_details(script_args, model_args, len(train_dataset), len(preservation)))
    return trainer


def describe_reward(script_args: NSPOScriptArguments, quote: str = "") -> str:
    """The recipe's rewards by name, and the judge model when one of them is a judge (for the card and --dry-run)."""
    text = ", ".join(f"{quote}{name}{quote}" for name in script_args.reward_funcs)
    if any(name in JUDGES for name in script_args.reward_funcs):
        text += f" (judge {quote}{script_args.judge_model}{quote})"
    return text


def card_details(
    script_args: NSPOScriptArguments, model_args: ModelConfig, num_prompts: int, num_preservation: int
) -> dict[str, str]:
    """The model card's description of the run: base model, data, reward and judge, as the recipe names them."""
    details = {}
    if not script_args.build_tiny_model and not Path(model_args.model_name_or_path).is_dir():
        details["base model"] = model_args.model_name_or_path  # a Hub id, even when loaded from a local conversion
    fraction = f", {script_args.train_fraction:g} of its unique prompts" if script_args.train_fraction != 1 else ""
    details["safety training data"] = (
        f"`{script_args.dataset_name}` [{script_args.dataset_train_split}]{fraction}: {num_prompts} prompts"
    )
    details["reward"] = describe_reward(script_args, quote="`")
    answered = ", answered by the reference model" if script_args.generate_preservation_responses else ""
    details["preservation data"] = f"`{script_args.preservation_dataset_name}`: {num_preservation} examples{answered}"
    return details


def heldout_summary(script_args: NSPOScriptArguments, trainer: NSPOTrainer) -> HeldoutSummary | None:
    """The before-training half of the held-out figures, when the recipe names held-out sets."""
    if not script_args.heldout_harmful_dataset:
        return None
    harmful = load_named_dataset(script_args.heldout_harmful_dataset, script_args.heldout_harmful_split)
    general = load_named_dataset(script_args.heldout_general_dataset)
    for name, dataset in (("heldout_harmful_dataset", harmful), ("heldout_general_dataset", general)):
        if "prompt" not in dataset.column_names or not len(dataset):
            raise ValueError(f"{name}: needs a non-empty 'prompt' column of conversations.")
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    reference = AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path, dtype=trainer.model.dtype)
    overrefusal = []
    if script_args.heldout_overrefusal_dataset:
        overrefusal = load_named_dataset(script_args.heldout_overrefusal_dataset, field="heldout_overrefusal_dataset")
        overrefusal = list(overrefusal["prompt"])
    from nspo_trl.judge.embedder import judge_extra_missing

    return HeldoutSummary(
        reference.to(trainer.model.device),
        tokenizer,
        harmful["prompt"],
        general["prompt"],
        script_args.heldout_max_new_tokens,
        overrefusal_prompts=overrefusal,
        learned_judge=not judge_extra_missing(),
        capability=script_args.heldout_capability,
    )


def preflight(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> None:
    """Every check that needs no model, made before any file or folder is written.

    A setting that would fail later (at the first generation, when the projector or the checkpoint is
    read) would otherwise leave an empty run folder behind, which shadows the next ``resume: true``.
    """
    from nspo_trl.nullspace.projector import METADATA_FILE
    from nspo_trl.trainer import checkpointing

    if not training_args.temperature > 0:
        raise ValueError(
            f"temperature: {training_args.temperature:g} is not > 0; GRPO samples its completions (greedy decoding "
            "gives every completion of a prompt the same reward, hence no signal). Use e.g. 1.0."
        )
    if model_args.use_peft and model_args.use_dora:
        raise ValueError("use_dora: DoRA rescales the columns of W + BA, which leaves the null space; NSPO trains "
                         "plain LoRA (set use_dora: false).")  # fmt: skip
    projector = Path(training_args.nspo_projector_path).expanduser() if training_args.nspo_projector_path else None
    built = projector is not None and (projector / METADATA_FILE).is_file()
    if built and not any(projector.glob("factors-rank*.safetensors")):
        raise ValueError(
            f"nspo_projector_path: {projector} holds {METADATA_FILE} but no factors-rank*.safetensors; delete the "
            "folder to rebuild the projector there."
        )
    if projector is not None and not built and projector.is_dir() and any(projector.iterdir()):
        raise ValueError(
            f"nspo_projector_path: {projector} holds no NSPO projector ({METADATA_FILE} + factors-rank*); point it "
            "at a projector, or at an empty or new folder to build one there."
        )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        steps = checkpointing.checkpoint_steps(Path(training_args.output_dir))
        if not any(checkpointing.read_commit(path) is not None for _, path in steps):
            raise ValueError(
                f"resume_from_checkpoint: {training_args.output_dir} holds no committed checkpoint yet; start "
                "without resume_from_checkpoint (or point output_dir at the run to resume)."
            )
    elif isinstance(resume, str) and resume:
        state = Path(resume).expanduser() / checkpointing.NSPO_STATE_DIR
        if not state.is_dir():
            raise ValueError(
                f"resume_from_checkpoint: {resume} is not an NSPO checkpoint (no {checkpointing.NSPO_STATE_DIR}/ "
                "folder); pass a checkpoint-N folder of an NSPO run, or true for the newest one in output_dir."
            )


def main(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    preflight(script_args, training_args, model_args)
    if script_args.heldout_harmful_dataset and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("heldout_harmful_dataset: the summary evaluation runs in one process; use nspo_trl.eval.")
    if script_args.gpu_memory_gib is not None:  # before anything is loaded; every rank decides alike
        world, backend = launch_shape()
        lines, fits = plan_report(script_args, training_args, model_args, world, backend, script_args.gpu_memory_gib)
        if not fits and training_args.process_index == 0:
            for line in lines:
                logger.info(line)
        refuse_if_over_budget(script_args, fits)
    if training_args.process_index == 0:
        for line in describe_batch(script_args, training_args, training_args.world_size):
            logger.info(line)
    trainer = build_trainer(script_args, training_args, model_args)
    heldout = heldout_summary(script_args, trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    summary = summarize(trainer, time.time() - start)
    if heldout is not None:
        summary["heldout"] = heldout.after(trainer.model)
    if trainer.accelerator.is_main_process:
        (Path(training_args.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return summary


def deciding_settings(
    script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig, num_processes: int
) -> list[tuple[str, str]]:
    """``(what, value)`` for every setting that decides what a run does, whether or not it is a default."""
    batch = effective_batch(training_args, num_processes)
    data = f"{script_args.dataset_name} [{script_args.dataset_train_split}]"
    if script_args.train_fraction != 1.0 or script_args.harmful_only:
        data += f", fraction {script_args.train_fraction:g}" + (", harmful only" if script_args.harmful_only else "")
    preservation = f"{script_args.preservation_dataset_name} [{script_args.preservation_dataset_split}]"
    count = training_args.nspo_num_preservation_samples
    preservation += f", {'all' if count is None else count} examples"
    if script_args.generate_preservation_responses:
        preservation += f", answered by the reference ({script_args.preservation_max_new_tokens} tokens)"
    epochs = f"{training_args.num_train_epochs:g} epoch(s)"
    length = f"{training_args.max_steps} steps" if training_args.max_steps > 0 else epochs
    generation = "vLLM " + training_args.vllm_mode if training_args.use_vllm else "transformers"
    return [
        (
            "model",
            f"{model_args.model_name_or_path} ({model_args.dtype or 'auto'}"
            f"{', LoRA r=' + str(model_args.lora_r) if model_args.use_peft else ''})",
        ),
        ("training prompts", data),
        ("reward", describe_reward(script_args)),
        ("learning rate", f"{training_args.learning_rate:g} ({training_args.lr_scheduler_type.value}), {length}"),
        (
            "global batch",
            f"{batch['completions_per_step']} completions per optimizer step = "
            f"{training_args.per_device_train_batch_size} per device x "
            f"{training_args.gradient_accumulation_steps} accumulation x {num_processes} process(es)",
        ),
        (
            "generations",
            f"{training_args.num_generations} per prompt, {batch['prompts_per_generation']:g} prompts per "
            f"generation, via {generation}",
        ),
        (
            "completion length",
            f"{training_args.max_completion_length} tokens, temperature {training_args.temperature:g}",
        ),
        ("KL beta", f"{training_args.beta:g}"),
        ("preservation data", preservation),
        ("null space", f"alpha {training_args.nspo_alpha:g}, targets {training_args.nspo_target_modules}"),
        (
            "projection",
            f"every {training_args.nspo_project_every} step(s)"
            + (", gradients projected before the optimizer" if training_args.nspo_project_gradients else ""),
        ),
        ("output", f"{training_args.output_dir} (seed {training_args.seed})"),
    ]


def dry_run(script_args: NSPOScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> None:
    """Print, on the main process only, the settings that decide the run, the other fields that differ
    from their defaults, the effective batch and the memory plan; load nothing, write nothing."""
    import yaml

    preflight(script_args, training_args, model_args)
    world, backend = launch_shape()
    if int(os.environ.get("RANK", "0")) != 0:  # every rank checks; one prints
        fits = plan_report(script_args, training_args, model_args, world, backend, script_args.gpu_memory_gib)[1]
        refuse_if_over_budget(script_args, fits)
        return
    settings = deciding_settings(script_args, training_args, model_args, world)
    width = max(len(what) for what, _ in settings)
    print("\n".join(f"{what:<{width}}  {value}" for what, value in settings))
    resolved = {}
    for name, obj in zip(("script", "training", "model"), (script_args, training_args, model_args), strict=True):
        changed = {}
        for f in dataclasses.fields(obj):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = getattr(obj, f.name)
            if value != default and f.name != "dry_run":
                value = value.value if isinstance(value, enum.Enum) else value
                plain = type(value) in (int, float, str, bool, list, type(None))
                changed[f.name] = value if plain else str(value)
        resolved[name] = changed
    print("\nevery field that differs from its default:")
    print(yaml.safe_dump(resolved, sort_keys=True, width=119))
    print("\n".join(describe_batch(script_args, training_args, world)))
    fits = print_plan(script_args, training_args, model_args, world, backend, script_args.gpu_memory_gib)
    refuse_if_over_budget(script_args, fits)


def launch_shape() -> tuple[int, str]:
    """``(processes, backend)`` of the current launch: under ``accelerate launch``, its ranks and ZeRO stage."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    backend = ("zero3" if stage == "3" else "zero2") if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else "ddp"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, backend


def refuse_if_over_budget(script_args: NSPOScriptArguments, fits: bool) -> None:
    if not fits and not script_args.ignore_memory_plan:
        raise ValueError(
            f"gpu_memory_gib: the plan does not fit {script_args.gpu_memory_gib:g} GiB per GPU "
            "(python -m nspo_trl.planning ... --gpu-memory shows the phase and term); shrink the recipe, "
            "or set ignore_memory_plan: true."
        )


def effective_batch(training_args: NSPOConfig, num_processes: int) -> dict[str, float]:
    """The batch a launch really trains with, from the per-device figures and the number of processes.

    ``completions_per_step`` = per-device batch × accumulation × processes (one optimizer step);
    ``completions_per_generation`` = per-device batch × ``steps_per_generation`` × processes (one
    vLLM/transformers generation round), of which ``prompts_per_generation`` = that / ``num_generations``.
    """
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * num_processes
    per_generation = training_args.per_device_train_batch_size * training_args.steps_per_generation * num_processes
    return {
        "processes": num_processes,
        "completions_per_step": per_step,
        "completions_per_generation": per_generation,
        "prompts_per_generation": per_generation / training_args.num_generations,
        "steps_per_generation": training_args.steps_per_generation / training_args.gradient_accumulation_steps,
    }


def describe_batch(script_args: NSPOScriptArguments, training_args: NSPOConfig, num_processes: int) -> list[str]:
    """One line with the effective batch, and a warning line when the launch differs from the recipe's."""
    batch = effective_batch(training_args, num_processes)
    lines = [
        f"effective batch on {num_processes} process(es): {batch['completions_per_step']} completions per optimizer "
        f"step; {batch['completions_per_generation']} per generation ({batch['prompts_per_generation']:g} prompts x "
        f"{training_args.num_generations}), {batch['steps_per_generation']:g} optimizer step(s) per generation"
    ]
    intended = script_args.recipe_num_processes
    if intended is not None and intended != num_processes:
        wanted = effective_batch(training_args, intended)
        lines.append(
            f"warning: recipe_num_processes is {intended}, this launch has {num_processes}: the recipe's "
            f"{wanted['completions_per_step']} completions per optimizer step become {batch['completions_per_step']}; "
            "scale gradient_accumulation_steps and steps_per_generation, or launch as the recipe says."
        )
    return lines


def cli(argv: list[str] | None = None, prog: str = "python -m nspo_trl.train") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_command_line()
    free_master_port()
    try:
        check_versions(("trl", "transformers", "deepspeed"))
        script_args, training_args, model_args = parse(sys.argv[1:] if argv is None else argv, prog=prog)
        plain_output_when_piped(training_args)
        if script_args.dry_run:
            dry_run(script_args, training_args, model_args)
        else:
            main(script_args, training_args, model_args)
    except (ValueError, JudgeError, NotImplementedError) as err:  # bad settings, no judge, unsupported launch
        fail(f"error: {err}")
        return 2
    except OSError as err:  # the disk filled up, a file vanished, ...: committed checkpoints stay usable
        where = f"{err.filename}: " if err.filename else ""
        fail(f"error: {where}{err.strerror or err}; checkpoints committed before this stay usable "
             "(--resume_from_checkpoint true).")  # fmt: skip
        return 1
    except KeyboardInterrupt:
        fail("interrupted; resume from the last committed checkpoint with --resume_from_checkpoint true.")
        return 130
    return 0


def fail(message: str) -> None:
    """Print ``nspo_trl.train: <message>`` on a line of its own, after closing any open progress bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()  # a bar left open would have the message glued to its last \r-line
    sys.stderr.flush()
    print(f"nspo_trl.train: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(cli())
