"""Judges for the safety suite: ``conversations → verdicts`` (unsafe or not, with categories).

- ``llama_guard``: Llama Guard behind an OpenAI-compatible server (``vllm serve``), retried, failing
  loudly (:class:`~nspo_trl.rewards.LlamaGuardReward`);
- ``local``: Llama Guard in this process, unsafe when ``P(unsafe) ≥ 0.5``
  (:class:`~nspo_trl.rewards.LocalGuardReward`; no categories);
- ``module:attribute``: any importable callable with the same signature (a scripted judge for
  tests, or another classifier).

A judge never returns "safe" for a response it could not judge: it raises ``JudgeError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from nspo_trl.importing import import_object
from nspo_trl.rewards.guard import GuardVerdict

Conversation = list[dict[str, str]]
Judge = Callable[[Sequence[Conversation]], list[GuardVerdict]]


def make_judge(kind: str, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> Judge:
    """The judge named by ``--judge`` (see the module docstring)."""
    if kind == "llama_guard":
        from nspo_trl.rewards import LlamaGuardReward

        reward = LlamaGuardReward(base_url, model, api_key=api_key, timeout=timeout)
        return lambda conversations: asyncio.run(reward.judge(list(conversations)))
    if kind == "local":
        from nspo_trl.rewards import LocalGuardReward

        return LocalGuardReward(model, mode="threshold").judge
    if ":" not in kind:
        raise ValueError(f"judge: {kind!r} is not llama_guard, local or module:attribute.")
    return import_object(kind, "judge")
