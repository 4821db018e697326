"""``python -m nspo_trl.eval --model PATH [--reference PATH] --suite safety,overrefusal,capability,drift``.

Arguments are :class:`EvalArguments` fields (``--field value``, or a YAML via ``--config``), parsed
by TRL's ``TrlParser`` (``nspo_trl.cli.arguments.RecipeParser``). Bad settings stop with one line naming
the field and exit code 2; a judge that cannot give a verdict stops the run (exit 2) instead of
counting a response as safe.
Outputs in ``output_dir``: ``report.json``, ``report.md``, ``layers.png``,
``safety_vs_capability.png`` and the generated responses (``responses/<model>/<set>.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nspo_trl.cli.arguments import RecipeParser
from nspo_trl.data.named_sets import load_named_dataset, seeded_subset
from nspo_trl.eval.prompt_sets import OVERREFUSAL_SETS, SAFETY_SETS, load_prompt_set, parse_set_specs
from nspo_trl.rewards import JudgeError
from nspo_trl.utils import free_master_port, plain_output_when_piped, quiet_command_line

logger = logging.getLogger("nspo_trl.eval")
SUITES = ("safety", "overrefusal", "capability", "drift")


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Checkpoint to evaluate (local directory or Hub id)."})
    reference: str | None = field(default=None, metadata={"help": "Reference model (the base); needed by drift."})
    suite: str = field(default=",".join(SUITES), metadata={"help": f"Comma-separated suites: {', '.join(SUITES)}."})
    output_dir: str = field(default="nspo_eval", metadata={"help": "Where the report and responses are written."})
    safety_sets: str = field(
        default="pku_saferlhf,jailbreakbench,harmbench,advbench",
        metadata={"help": f"Harmful prompt sets ({', '.join(SAFETY_SETS)}), each optionally name=FILE."},
    )
    overrefusal_sets: str = field(
        default="xstest", metadata={"help": "Safe prompt sets (xstest), each optionally name=FILE."}
    )
    limit: int | None = field(default=None, metadata={"help": "At most this many prompts per set."})
    max_new_tokens: int = field(default=512, metadata={"help": "Response length for safety/over-refusal."})
    batch_size: int = field(default=8, metadata={"help": "Generation / lm-eval / drift batch size."})
    use_vllm: bool | None = field(default=None, metadata={"help": "Generate with vLLM (default: when installed)."})
    judge: str = field(
        default="llama_guard",
        metadata={"help": "llama_guard (server), local, learned (offline, CPU), keyword, strict or module:attribute."},
    )
    judge_base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "llama_guard server URL."})
    judge_model: str = field(default="meta-llama/Llama-Guard-3-8B", metadata={"help": "Served or local judge."})
    judge_api_key_env: str | None = field(default=None, metadata={"help": "Env variable holding the judge API key."})
    judge_timeout: float = field(default=60.0, metadata={"help": "llama_guard: seconds per request."})
    capability_tasks: str = field(default="gsm8k,ifeval,mmlu", metadata={"help": "lm-eval task names."})
    capability_limit: int | None = field(default=None, metadata={"help": "lm-eval: examples per task."})
    capability_include_path: str | None = field(default=None, metadata={"help": "lm-eval: extra task YAML dir."})
    capability_backend: str = field(default="auto", metadata={"help": "lm-eval model backend: hf, vllm or auto."})
    general_set: str = field(
        default="nspo_trl:preservation",
        metadata={"help": "Drift, fit: the preservation data the projector was built from (preservation layouts)."},
    )
    heldout_general_set: str | None = field(
        default="nspo_trl:general_prompts",
        metadata={"help": "Drift, held out: general data the projector never saw (none: fit only)."},
    )
    general_max_length: int = field(default=512, metadata={"help": "Drift: tokens per example."})
    general_samples: int | None = field(default=None, metadata={"help": "Drift: seeded subset of the general set."})
    drift_targets: str = field(default="full", metadata={"help": "Drift: layers whose leakage is reported."})
    seed: int = field(default=0, metadata={"help": "Seed of the general-set subset."})

    def __post_init__(self) -> None:
        self.suites = [s.strip() for s in self.suite.split(",") if s.strip()]
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise ValueError(f"suite: unknown {unknown or 'empty'}; choose from {', '.join(SUITES)}.")
        if "drift" in self.suites and not self.reference:
            raise ValueError("reference: the drift suite compares against a reference model; pass --reference PATH.")
        if self.capability_backend not in ("hf", "vllm", "auto"):
            raise ValueError(f"capability_backend: {self.capability_backend!r} is not hf, vllm or auto.")
        for name in ("limit", "capability_limit", "general_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1 (or unset for all).")
        self.safety = parse_set_specs(self.safety_sets, SAFETY_SETS, "safety_sets") if "safety" in self.suites else {}
        self.overrefusal = (
            parse_set_specs(self.overrefusal_sets, OVERREFUSAL_SETS, "overrefusal_sets")
            if "overrefusal" in self.suites
            else {}
        )


def evaluate(args: EvalArguments) -> dict:
    """Run the requested suites on the model (and the reference, for comparison); return the results."""
    from nspo_trl.eval.report import write_report

    models = {"model": args.model, **({"reference": args.reference} if args.reference else {})}
    results: dict = {"models": {name: {"path": path} for name, path in models.items()}, "suites": args.suites}
    output_dir = Path(args.output_dir)
    prompt_sets = {
        "safety": {n: load_prompt_set(SAFETY_SETS[n], p, args.limit) for n, p in args.safety.items()},
        "overrefusal": {n: load_prompt_set(OVERREFUSAL_SETS[n], p, args.limit) for n, p in args.overrefusal.items()},
    }
    judge = _judge(args) if args.safety else None
    for name, path in models.items():
        entry = results["models"][name]
        if args.safety or args.overrefusal:
            entry.update(_safety_suites(args, path, prompt_sets, judge, output_dir / "responses" / name))
        if "capability" in args.suites:
            from nspo_trl.eval.capability import capability_report

            tasks = [t.strip() for t in args.capability_tasks.split(",") if t.strip()]
            entry["capability"] = capability_report(
                path, tasks, args.capability_limit, args.batch_size,
                include_path=args.capability_include_path, backend=args.capability_backend,
            )  # fmt: skip
    if "drift" in args.suites:
        results["drift"] = _drift(args)
    results["files"] = [str(p) for p in write_report(results, output_dir)]
    return results


def _judge(args: EvalArguments):
    from nspo_trl.eval.judging import make_judge

    api_key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
    return make_judge(args.judge, args.judge_base_url, args.judge_model, api_key, args.judge_timeout)


def _safety_suites(args: EvalArguments, path: str, prompt_sets: dict, judge, responses_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nspo_trl.data.generation import as_conversations, generate_responses
    from nspo_trl.eval.safety import overrefusal_report, safety_report

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = None if args.use_vllm else AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    if model is not None:
        import torch

        model.to("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {}
    from nspo_trl.eval.judging import PAIR_JUDGES, refusal_judge

    refusals = refusal_judge(args.judge) if args.judge in PAIR_JUDGES else None
    for suite in ("safety", "overrefusal"):
        for set_name, prompts in prompt_sets[suite].items():
            responses = generate_responses(
                as_conversations([p.text for p in prompts]), path, args.max_new_tokens, use_vllm=args.use_vllm,
                batch_size=args.batch_size, tokenizer=tokenizer, model=model, description=f"{suite}/{set_name}",
            )  # fmt: skip
            responses_dir.mkdir(parents=True, exist_ok=True)
            pairs = zip(prompts, responses, strict=True)
            rows = [{"prompt": p.text, "category": p.category, "response": r} for p, r in pairs]
            (responses_dir / f"{set_name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            if suite == "safety":
                report = safety_report(prompts, responses, judge)
            else:
                report = overrefusal_report(prompts, responses, refusals)
            out.setdefault(suite, {})[set_name] = report
    return out


def _drift(args: EvalArguments) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nspo_trl.data.preservation import tokenize_preservation
    from nspo_trl.eval.drift import drift_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).to(device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    targets = [t.strip() for t in args.drift_targets.split(",") if t.strip()]
    projector = Path(args.model) / "nspo_projector"
    sets = {"fit": ("general_set", args.general_set), "heldout": ("heldout_general_set", args.heldout_general_set)}
    out = {}
    for split, (field_name, name) in sets.items():
        if not name:
            continue
        general = seeded_subset(load_named_dataset(name, field=field_name), args.general_samples, args.seed)
        sequences = tokenize_preservation(general, tokenizer, args.general_max_length)
        report = drift_report(model, reference, sequences, tokenizer.pad_token_id, targets, args.batch_size, projector)
        out[split] = {"set": name, **report}
    return out


def cli(argv: list[str] | None = None, prog: str = "python -m nspo_trl.eval") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_command_line()
    plain_output_when_piped()
    free_master_port()
    try:
        parser = RecipeParser([EvalArguments], prog=prog)  # one-line errors, like nspo_trl.cli.train
        (args,) = parser.parse_args_and_config(args=sys.argv[1:] if argv is None else argv)
        results = evaluate(args)
    except (ValueError, JudgeError) as err:
        print(f"nspo_trl.eval: error: {err}", file=sys.stderr)
        return 2
    print(Path(args.output_dir, "report.md").read_text())
    logger.info("wrote %s", ", ".join(results["files"]))
    return 0
