"""Judges for the safety suite: ``conversations → verdicts`` (unsafe or not, with categories).

- ``llama_guard``: Llama Guard behind an OpenAI-compatible server (``vllm serve``), retried, failing
  loudly (:class:`~nspo_trl.rewards.LlamaGuardReward`);
- ``local``: Llama Guard in this process, unsafe when ``P(unsafe) ≥ 0.5``
  (:class:`~nspo_trl.rewards.LocalGuardReward`; no categories);
- ``learned``: the offline judge of :mod:`nspo_trl.judge` (measured against human labels; CPU);
- ``keyword`` / ``strict``: the rule judges (a response that does not refuse is unsafe);
- ``module:attribute``: any importable callable with the same signature (a scripted judge for
  tests, or another classifier).

A judge never returns "safe" for a response it could not judge: it raises ``JudgeError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from nspo_trl.rewards.guard import GuardVerdict
from nspo_trl.utils import import_object

Conversation = list[dict[str, str]]
Judge = Callable[[Sequence[Conversation]], list[GuardVerdict]]
PAIR_JUDGES = ("learned", "keyword", "strict")
"""Judges of :mod:`nspo_trl.eval.judges` that also say whether a response refused (for over-refusal)."""


def conversation_judge(kind: str) -> Judge:
    """A pair judge on judge-ready conversations (every prompt of a safety set is a harmful request)."""
    from nspo_trl.eval.judges import pair_judge
    from nspo_trl.judge.rules import prompt_text

    judge = pair_judge(kind)

    def verdicts(conversations: Sequence[Conversation]) -> list[GuardVerdict]:
        prompts = [prompt_text(c[:-1]) for c in conversations]  # the last turn is the response judged
        rows = judge(prompts, [c[-1]["content"] for c in conversations], [True] * len(conversations))
        return [GuardVerdict(unsafe=bool(row["unsafe"])) for row in rows]

    return verdicts


def refusal_judge(kind: str) -> Callable[[Sequence[str], Sequence[str]], list[bool]]:
    """``(prompts, responses) → refused`` by the pair judge ``kind``, for the over-refusal suite."""
    from nspo_trl.eval.judges import pair_judge

    judge = pair_judge(kind)
    return lambda prompts, responses: [bool(r["refused"]) for r in judge(prompts, responses, [False] * len(prompts))]


def make_judge(kind: str, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> Judge:
    """The judge named by ``--judge`` (see the module docstring)."""
    if kind == "llama_guard":
        from nspo_trl.rewards import LlamaGuardReward

        reward = LlamaGuardReward(base_url, model, api_key=api_key, timeout=timeout)
        return lambda conversations: asyncio.run(reward.judge(list(conversations)))
    if kind in PAIR_JUDGES:
        return conversation_judge(kind)
    if kind == "local":
        from nspo_trl.rewards import LocalGuardReward

        return LocalGuardReward(model, mode="threshold").judge
    if ":" not in kind:
        raise ValueError(f"judge: {kind!r} is not llama_guard, local, learned, keyword, strict or module:attribute.")
    return import_object(kind, "judge")
