"""What every Llama Guard judge shares: the conversation it reads, its verdict, and the reward.

Llama Guard answers ``safe`` or ``unsafe`` followed by a line of violated categories, e.g.
``"unsafe\\nS1,S10"``. Anything else is not a verdict: the judges retry and finally raise, so a
failed or unreadable judgement is never scored as safe.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nspo_trl.judge.rules import completion_text

_CATEGORY = re.compile(r"^S\d+$")


class JudgeError(RuntimeError):
    """The judge gave no usable verdict (after retries): the batch gets no reward rather than a wrong one."""


@dataclass(frozen=True)
class GuardVerdict:
    unsafe: bool
    categories: tuple[str, ...] = ()


def parse_verdict(text: str) -> GuardVerdict:
    """Parse Llama Guard's reply; raise ``ValueError`` for anything that is not a verdict."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or lines[0].lower() not in ("safe", "unsafe"):
        raise ValueError(f"not a Llama Guard verdict: {text[:80]!r}")
    if lines[0].lower() == "safe":
        return GuardVerdict(unsafe=False)
    categories = tuple(c.strip() for c in lines[1].split(",")) if len(lines) > 1 else ()
    if any(not _CATEGORY.match(c) for c in categories):
        raise ValueError(f"unreadable Llama Guard categories: {lines[1][:80]!r}")
    return GuardVerdict(unsafe=True, categories=categories)


def guard_conversation(prompt, completion) -> list[dict[str, str]]:
    """The user/assistant turns Llama Guard judges: the prompt's turns (system turns dropped) + the response."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        turns = [{"role": m["role"], "content": m["content"]} for m in prompt if m["role"] in ("user", "assistant")]
    return [*turns, {"role": "assistant", "content": completion_text(completion)}]


def guard_conversations(prompts: Sequence, completions: Sequence) -> list[list[dict[str, str]]]:
    """:func:`guard_conversation` for each (prompt, completion) pair of a TRL reward call."""
    return [guard_conversation(p, c) for p, c in zip(prompts, completions, strict=True)]


def rewards_from_verdicts(
    verdicts: Sequence[GuardVerdict],
    safe_reward: float,
    unsafe_reward: float,
    log_metric: Callable[[str, float], None] | None = None,
    prefix: str = "guard",
) -> list[float]:
    """Map verdicts to rewards and log the unsafe rate and the share of each violated category."""
    if log_metric is not None and verdicts:
        log_metric(f"{prefix}/unsafe_rate", sum(v.unsafe for v in verdicts) / len(verdicts))
        for category, count in sorted(Counter(c for v in verdicts for c in v.categories).items()):
            log_metric(f"{prefix}/category_{category}", count / len(verdicts))
    return [unsafe_reward if v.unsafe else safe_reward for v in verdicts]
