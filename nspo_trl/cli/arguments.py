"""Recipe arguments of ``nspo_trl``: data, reward and model-building fields, and the recipe parser.

A recipe is a YAML of :class:`NSPOScriptArguments`, :class:`~nspo_trl.trainer.nspo_config.NSPOConfig` and TRL's
``ModelConfig`` fields, checked (unknown fields, wrong types, missing files) before TRL's
``TrlParser`` parses it with any command-line overrides. Shared by ``nspo_trl.cli.train``,
``nspo_trl.planning.plan`` and ``nspo_trl.eval``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments, TrlParser

from nspo_trl.cli.packaged import RECIPES_DIR, recipe_path
from nspo_trl.cli.recipe import check_paths, check_recipe_fields, load_recipe
from nspo_trl.rewards import keyword_refusal_reward, refusal_prefix_reward, refusal_reward, tiered_refusal_reward
from nspo_trl.trainer.nspo_config import NSPOConfig, check_vllm_sleep_mode

DEFAULT_RECIPE = RECIPES_DIR / "smoke.yaml"
JUDGES = ("llama_guard", "local_guard")
LEARNED_JUDGE = "learned_judge"
REWARD_FUNCS = {
    "refusal": refusal_reward,
    "refusal_prefix": refusal_prefix_reward,
    "refusal_keyword": keyword_refusal_reward,
    "refusal_tiered": tiered_refusal_reward,
}


@dataclass
class NSPOScriptArguments(ScriptArguments):
    """Data, reward and model-building arguments of ``nspo_trl.cli.train`` (on top of TRL's ``ScriptArguments``)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["refusal"],
        metadata={
            "help": "Rewards: learned_judge, refusal, refusal_prefix, refusal_keyword, refusal_tiered, llama_guard, "
            "local_guard, 'module:function'."
        },
    )
    judge_base_url: str = field(
        default="http://127.0.0.1:8000/v1", metadata={"help": "llama_guard: the judge server's OpenAI API root."}
    )
    judge_model: str = field(
        default="meta-llama/Llama-Guard-3-8B",
        metadata={"help": "The judge model (served name, or path for local_guard)."},
    )
    judge_api_key_env: str | None = field(
        default=None, metadata={"help": "llama_guard: name of the environment variable holding the API key."}
    )
    judge_timeout: float = field(default=60.0, metadata={"help": "llama_guard: seconds per request."})
    judge_max_retries: int = field(default=3, metadata={"help": "llama_guard: retries per item before failing."})
    judge_max_concurrency: int = field(default=32, metadata={"help": "llama_guard: requests in flight."})
    judge_mode: str | None = field(
        default=None,
        metadata={
            "help": "local_guard: probability (−P(unsafe), its default) or threshold; learned_judge: threshold "
            "(0 / −1, its default) or probability."
        },
    )
    train_fraction: float = field(
        default=1.0, metadata={"help": "PKU-SafeRLHF: fraction of unique prompts to train on (paper: 0.4)."}
    )
    harmful_only: bool = field(
        default=False, metadata={"help": "Keep only training prompts labelled harmful ('is_harmful')."}
    )
    harmful_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Rebalance the training prompts to this share of harmful ones (seeded; the larger side is "
            "subsampled, the smaller kept whole), so a refusal reward's over-refusal penalty is not drowned out."
        },
    )
    preservation_dataset_name: str | None = field(
        default=None, metadata={"help": "General-task data for the null space (Hub id, local file, nspo_trl:<name>)."}
    )
    preservation_dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    preservation_dataset_split: str = field(default="train", metadata={"help": "Its split."})
    preservation_prompt_column: str | None = field(
        default=None, metadata={"help": "Map this prompt column (and the response column) to conversations."}
    )
    preservation_response_column: str | None = field(default=None, metadata={"help": "Its response column."})
    preservation_input_column: str | None = field(
        default=None, metadata={"help": "Optional extra input column appended to the prompt (Alpaca's 'input')."}
    )
    generate_preservation_responses: bool = field(
        default=False, metadata={"help": "Answer the preservation prompts with the reference model (greedy)."}
    )
    preservation_max_new_tokens: int = field(default=256, metadata={"help": "Length of generated responses."})
    heldout_harmful_dataset: str | None = field(
        default=None,
        metadata={"help": "Summary: refusal rate before/after training on these prompts (e.g. nspo_trl:harmbench)."},
    )
    heldout_harmful_split: str = field(default="test", metadata={"help": "Its split (never trained on)."})
    heldout_general_dataset: str | None = field(
        default=None,
        metadata={"help": "Summary: drift KL on these general prompts (e.g. nspo_trl:general_prompts)."},
    )
    heldout_max_new_tokens: int = field(default=16, metadata={"help": "Summary: tokens per greedy answer."})
    heldout_overrefusal_dataset: str | None = field(
        default=None,
        metadata={"help": "Summary: the learned judge's over-refusal on these benign prompts."},
    )
    heldout_capability: bool = field(
        default=False, metadata={"help": "Summary: the exact-match capability score (280 tasks) before and after."}
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "Build a tiny random Qwen2 model + tokenizer at model_name_or_path if none is there."},
    )
    tiny_hidden_size: int = field(default=256, metadata={"help": "Hidden size of the tiny model."})
    tiny_intermediate_size: int = field(default=512, metadata={"help": "MLP width of the tiny model."})
    recipe_num_processes: int | None = field(
        default=None,
        metadata={
            "help": "Processes (GPUs) the recipe's batch arithmetic is written for; a launch with another "
            "number changes the effective batch, and --dry-run and train say so."
        },
    )
    gpu_memory_gib: float | None = field(
        default=None,
        metadata={
            "help": "GiB per GPU of the launch (an H100 80GB: 79.6): --dry-run and train refuse a recipe whose plan "
            "(python -m nspo_trl.planning --gpu-memory) does not fit."
        },
    )
    ignore_memory_plan: bool = field(
        default=False, metadata={"help": "Run even when the plan says gpu_memory_gib does not fit."}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Check the recipe and print the resolved config and memory figures; load and write nothing."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}; the paper uses 0.4.")
        if self.harmful_fraction is not None and not (0.0 < self.harmful_fraction < 1.0):
            raise ValueError(
                f"harmful_fraction must lie strictly between 0 and 1, got {self.harmful_fraction}; "
                "use harmful_only for 1, or leave it unset to keep the data's own mix."
            )
        if self.harmful_fraction is not None and self.harmful_only:
            raise ValueError("harmful_fraction: cannot rebalance with harmful_only set; choose one.")
        if self.judge_mode is not None and self.judge_mode not in ("probability", "threshold"):
            raise ValueError(f"judge_mode must be 'probability' or 'threshold', got {self.judge_mode!r}.")
        if bool(self.heldout_harmful_dataset) != bool(self.heldout_general_dataset):
            raise ValueError("heldout_general_dataset: set both held-out sets (harmful and general) or neither.")
        for name, ok in (
            ("judge_timeout", math.isfinite(self.judge_timeout) and self.judge_timeout > 0),
            ("judge_max_retries", self.judge_max_retries >= 0),
            ("judge_max_concurrency", self.judge_max_concurrency >= 1),
        ):
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range (timeout > 0, retries >= 0, "
                                 "concurrency >= 1).")  # fmt: skip
        if self.gpu_memory_gib is not None and not (math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0):
            raise ValueError(f"gpu_memory_gib must be a finite number > 0, got {self.gpu_memory_gib!r}.")
        if self.recipe_num_processes is not None and self.recipe_num_processes < 1:
            raise ValueError(f"recipe_num_processes must be >= 1, got {self.recipe_num_processes}.")
        if self.heldout_max_new_tokens < 1:
            raise ValueError(f"heldout_max_new_tokens must be >= 1, got {self.heldout_max_new_tokens}.")
        known_names = {*REWARD_FUNCS, *JUDGES, LEARNED_JUDGE}
        unknown = [n for n in self.reward_funcs if n not in known_names and ":" not in n]
        if unknown:
            known = sorted(known_names)
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            if "." in unknown[0]:
                module, _, attribute = unknown[0].rpartition(".")
                hint = f"write an importable function as '{module}:{attribute}'; "
            raise ValueError(f"reward_funcs: {unknown[0]!r} is unknown; {hint}use one of {known} or 'module:func'.")
        if LEARNED_JUDGE in self.reward_funcs:
            from nspo_trl.judge.embedder import require_judge_extra

            try:
                require_judge_extra()
            except ImportError as err:
                raise ValueError(f"reward_funcs: {LEARNED_JUDGE}: {err}") from None


DATACLASSES = (NSPOScriptArguments, NSPOConfig, ModelConfig)


class RecipeParser(TrlParser):
    """``TrlParser`` whose argument errors are one-line ``ValueError`` s instead of a usage dump."""

    def error(self, message: str):
        raise ValueError(message)

    def parse_known_args(self, args=None, namespace=None):
        """Unknown options fail with the closest known one suggested (``--nspo_alfa`` → ``--nspo_alpha``)."""
        namespace, unknown = super().parse_known_args(args, namespace)
        options = [u for u in unknown if u.startswith("--")]
        if options:
            name = options[0].split("=", 1)[0]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.error(f"{name}: unknown option{hint}")
        return namespace, unknown


def make_parser(prog: str | None = None) -> TrlParser:
    return RecipeParser(DATACLASSES, prog=prog)


def parse(argv: list[str], prog: str | None = None) -> tuple[NSPOScriptArguments, NSPOConfig, ModelConfig]:
    """A leading recipe (a path, or a shipped name like ``qwen7b``) is ``--config``; none means the smoke recipe.

    The recipe is checked first (unknown fields, wrong types), then parsed with TRL's parser.
    """
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    at = argv.index("--config") + 1
    if at == len(argv):
        raise ValueError("--config: name a recipe file or a shipped recipe (nspo-trl recipes lists them).")
    argv[at] = str(recipe_path(argv[at]))
    recipe = load_recipe(argv[at])
    check_recipe_fields(recipe, DATACLASSES)
    dry_run = any(a in ("--dry-run", "--dry_run") for a in argv) or bool(recipe.get("dry_run"))
    simulated_cpu = dry_run and not torch.cuda.is_available() and not recipe.get("use_cpu")
    if simulated_cpu:  # let a GPU recipe (bf16) be checked on a machine without a GPU
        argv += ["--use_cpu", "true"]
    script_args, training_args, model_args = make_parser(prog).parse_args_and_config(args=argv)
    if simulated_cpu:
        training_args.use_cpu = False
    check_vllm_sleep_mode(training_args)
    check_paths(script_args, model_args)
    return script_args, training_args, model_args
