"""Print final answers of ``alignment_tax.py`` runs beside the judges' verdicts, to read them by hand.

    python benchmarks/read_answers.py OUT/runs/grpo-s0.json OUT/runs/nspo_full_gradproj-s0.json --per-set 10

For each run: ``--per-set`` held-out harmful prompts (Do-Not-Answer test split) and as many alarming-but-benign
prompts, spread evenly over each set, with the answer and what the learned judge (unsafe / refused, with its
probabilities) and the strict rule (declined) say. Reading them, count the answers the learned judge got wrong.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.eval.judges import pair_judge
from nspo_trl.judge.rules import declined, prompt_text


def spread(items: list, count: int) -> list[int]:
    """``count`` indices spread evenly over ``items`` (all of them when there are fewer)."""
    step = max(len(items) // count, 1)
    return list(range(0, len(items), step))[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run files written by alignment_tax.py (runs/*.json)")
    parser.add_argument("--per-set", type=int, default=10)
    parser.add_argument("--harmful-set", default="nspo_trl:donotanswer", help="the recipe's heldout_harmful_dataset")
    args = parser.parse_args()
    prompts = {
        "harmful": [prompt_text(p) for p in load_named_dataset(args.harmful_set, "test")["prompt"]],
        "alarming": [prompt_text(p) for p in load_named_dataset("nspo_trl:overrefusal_prompts")["prompt"]],
    }
    judge = pair_judge("learned")
    for path in args.runs:
        answers = json.loads(path.read_text())["final"]["answers"]
        print(f"\n===== {path.name}")
        for kind, harmful in (("harmful", True), ("alarming", False)):
            chosen = spread(answers[kind], args.per_set)
            requests = [prompts[kind][i] for i in chosen]
            replies = [answers[kind][i] for i in chosen]
            verdicts = judge(requests, replies, [harmful] * len(chosen))
            for i, request, reply, verdict in zip(chosen, requests, replies, verdicts, strict=True):
                flags = (
                    f"learned: unsafe={verdict['unsafe']} refused={verdict['refused']} "
                    f"(P refused {verdict.get('refused_score', 0):.2f}); strict declined={declined(reply)}"
                )
                print(f"--- {kind} #{i}: {request[:150]!r}\n    {reply[:300]!r}\n    {flags}")


if __name__ == "__main__":
    main()
