"""A capability score a user recognises: the share of short tasks answered exactly, offline, greedy.

The tasks (``nspo_trl/resources/capability_tasks.jsonl``, written by ``benchmarks/make_capability_set.py``)
are 200 two-term arithmetic problems from reasoning-gym's ``basic_arithmetic`` generator (seed 7) and
80 short fact questions, none of them in the preservation or drift prompts, asked as they are (no
format instruction: SmolLM2-135M-Instruct ignores one). An answer is scored as follows:

- arithmetic: the answer's *result* is the first number stated as one ("= 16", "is 16", "equals 16",
  "gives 16", "get 16"), or, when it states none, the last number of its first line; correct when that
  is the exact result ("6 + 10 = 16." and "we add 6 and 10, which is 16" are correct; "which is 1" and
  "6 + 10 = 61, so 16" are not);
- facts: correct when the expected answer appears in the first non-empty line as whole words, ignoring case.

The score is the share correct, ``p``, with its standard error ``sqrt(p (1 − p) / n)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from nspo_trl.data.named_sets import bundled_path

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
STATED_RESULT = re.compile(
    r"(?:=|\bis|\bequals|\bgives(?: us)?|\bget|\bmakes)\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE
)


def load_capability_tasks() -> list[dict]:
    """The bundled tasks: ``prompt``, ``answer`` and ``kind`` (``arithmetic`` or ``facts``)."""
    lines = bundled_path("capability_tasks").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def arithmetic_result(response: str) -> str | None:
    """The number an answer states as its result (module docstring), without thousands separators."""
    stated = STATED_RESULT.search(response)
    if stated:
        return stated.group(1).replace(",", "").rstrip(".")
    numbers = NUMBER.findall(first_line(response))
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def is_correct(task: dict, response: str) -> bool:
    """Whether ``response`` answers ``task`` exactly (module docstring)."""
    line = first_line(response)
    if task["kind"] == "arithmetic":
        return arithmetic_result(response) == task["answer"]
    return re.search(rf"\b{re.escape(task['answer'].lower())}\b", line.lower()) is not None


def exact_match_report(tasks: Sequence[dict], responses: Sequence[str]) -> dict:
    """``{score, stderr, n, by_kind: {kind: {score, n}}}`` of ``responses`` to ``tasks``."""
    correct = [is_correct(t, r) for t, r in zip(tasks, responses, strict=True)]
    n = len(correct)
    score = sum(correct) / n if n else float("nan")
    by_kind: dict[str, list[int]] = {}
    for task, ok in zip(tasks, correct, strict=True):
        entry = by_kind.setdefault(task["kind"], [0, 0])
        entry[0] += ok
        entry[1] += 1
    return {
        "score": score,
        "stderr": math.sqrt(score * (1 - score) / n) if n else float("nan"),
        "n": n,
        "by_kind": {k: {"score": c / m, "n": m} for k, (c, m) in sorted(by_kind.items())},
    }


def capability_score(model, tokenizer, tasks: Sequence[dict] | None = None, max_new_tokens: int = 40,
                     batch_size: int = 16) -> dict:  # fmt: skip
    """Greedy answers of ``model`` to ``tasks`` (default: the bundled set), scored by :func:`exact_match_report`."""
    from nspo_trl.eval.answers import greedy_answers

    tasks = list(tasks) if tasks is not None else load_capability_tasks()
    prompts = [[{"role": "user", "content": t["prompt"]}] for t in tasks]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    return {**exact_match_report(tasks, answers), "answers": answers}
