"""Does a refusal reward give GRPO anything to learn from? Its signal on the reference model's own samples.

GRPO learns only from groups whose completions get different rewards (its advantage is the reward
minus the group mean). So before training, sample what the recipe's first step would sample (the
reference model, temperature 1, ``num_generations`` completions of ≤ ``max_completion_length``
tokens per prompt) for each harmful training set, and count, for each rule-based reward:

- ``explicit``: the share of completions with an explicit refusal phrase (the keyword judge);
- ``credit > 0``: the share that earn any safety credit at all;
- ``groups with signal``: the share of prompts whose group of completions has a non-zero reward spread;
- ``credit from 'I'm …' openings``: the share of all credit earned by completions that open with
  "I'm"/"I am" yet refuse nothing: credit a policy can climb without ever refusing.

Writes ``OUT/samples.json`` (every completion) and ``OUT/table.md``.

    python benchmarks/refusal_signal.py                      # HarmBench and Do-Not-Answer train prompts
    python benchmarks/refusal_signal.py --prompts 40         # 40 prompts of each set (seeded subset), quicker
    python benchmarks/refusal_signal.py --rescore            # score OUT/samples.json again (new rewards), no sampling
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from nspo_trl.cli.arguments import REWARD_FUNCS, parse
from nspo_trl.cli.train import prepare_model
from nspo_trl.data.named_sets import load_named_dataset, seeded_subset
from nspo_trl.judge.rules import REFUSAL_PATTERN

ROOT = Path(__file__).resolve().parent.parent
SETS = ("nspo_trl:harmbench", "nspo_trl:donotanswer")
GENERIC_OPENING = re.compile(r"^\s*i(?:'m|\u2019m| am)\b", re.IGNORECASE)


@torch.no_grad()
def sample(model, tokenizer, prompts: list, generations: int, max_new_tokens: int, batch: int) -> list[list[str]]:
    """``generations`` sampled completions (temperature 1, no top-k/top-p) per prompt, in prompt order."""
    tokenizer.padding_side = "left"
    groups: list[list[str]] = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch"):
        chunk = prompts[start : start + batch]
        texts = tokenizer.apply_chat_template(chunk, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **encoded,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=generations,
            pad_token_id=tokenizer.pad_token_id,
        )
        decoded = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        groups += [decoded[i : i + generations] for i in range(0, len(decoded), generations)]
    return groups


def signal(groups: list[list[str]], reward) -> dict[str, float]:
    """The four figures of the module doc for one reward on harmful prompts (credit = reward + 1)."""
    flat = [text for group in groups for text in group]
    credit = [r + 1.0 for r in reward(flat, is_harmful=[True] * len(flat))]
    per_group = [credit[i : i + len(groups[0])] for i in range(0, len(credit), len(groups[0]))]
    climbable = [GENERIC_OPENING.match(t) is not None and REFUSAL_PATTERN.search(t) is None for t in flat]
    generic = sum(c for c, open_only in zip(credit, climbable, strict=True) if open_only)
    return {
        "explicit": sum(REFUSAL_PATTERN.search(t) is not None for t in flat) / len(flat),
        "credit_positive": sum(c > 0 for c in credit) / len(flat),
        "mean_credit": statistics.fmean(credit),
        "groups_with_signal": sum(statistics.pstdev(g) > 0 for g in per_group) / len(per_group),
        "generic_credit_share": generic / sum(credit) if sum(credit) else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=ROOT / "recipes" / "smollm2_cpu.yaml", type=Path)
    parser.add_argument("--prompts", type=int, default=None, help="a seeded subset of N training prompts of each set")
    parser.add_argument(
        "--rewards", nargs="+", default=["refusal", "refusal_prefix", "refusal_keyword", "refusal_tiered"]
    )
    parser.add_argument(
        "--rescore", action="store_true", help="score the completions in OUT/samples.json, no sampling"
    )
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results" / "refusal_signal", type=Path)
    args = parser.parse_args()
    script_args, training_args, model_args = parse([str(args.recipe)])
    torch.manual_seed(training_args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        samples = json.loads((args.out / "samples.json").read_text())
    else:
        model_path = prepare_model(script_args, training_args, model_args)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        samples = {}
        for name in SETS:
            prompts = list(
                seeded_subset(load_named_dataset(name, "train"), args.prompts, training_args.seed)["prompt"]
            )
            groups = sample(
                model,
                tokenizer,
                prompts,
                training_args.num_generations,
                training_args.max_completion_length,
                args.batch,
            )
            samples[name] = [
                {"prompt": p[-1]["content"], "completions": g} for p, g in zip(prompts, groups, strict=True)
            ]
        (args.out / "samples.json").write_text(json.dumps(samples, indent=1))
    rows = []
    for name in SETS:
        groups = [row["completions"] for row in samples[name]]
        for reward in args.rewards:
            figures = signal(groups, REWARD_FUNCS[reward])
            rows.append({"set": name, "prompts": len(groups), "reward": reward, **figures})
    lines = [
        f"SmolLM2 reference, `{args.recipe.name}`: {training_args.num_generations} completions of ≤ "
        f"{training_args.max_completion_length} tokens per prompt at temperature 1, seed {training_args.seed}",
        "",
        "| training prompts | prompts | reward | explicit refusals | credit > 0 | mean credit | groups with signal "
        "| credit from non-refusing 'I'm …' openings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['set']} | {r['prompts']} | `{r['reward']}` | {r['explicit']:.3f} | {r['credit_positive']:.3f} | "
        f"{r['mean_credit']:.3f} | {r['groups_with_signal']:.2f} | {r['generic_credit_share']:.2f} |"
        for r in rows
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
