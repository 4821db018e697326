"""Safety rewards as TRL reward callables.

- :class:`LlamaGuardReward`: Llama Guard behind an OpenAI-compatible server (``vllm serve``), async,
  batched, retried, failing loudly;
- :class:`LocalGuardReward`: the same judge in-process with transformers, from next-token logits;
- :class:`LearnedJudgeReward` (``learned_judge``): the offline judge of :mod:`nspo_trl.judge`, measured
  against human labels, on CPU;
- :func:`refusal_reward`, :func:`refusal_prefix_reward`, :func:`keyword_refusal_reward`,
  :func:`tiered_refusal_reward`: rule-based
  refusal proxies for smoke runs, CPU runs on a real model, and tests.
"""

from nspo_trl.judge.rules import completion_text
from nspo_trl.rewards.guard import GuardVerdict, JudgeError, guard_conversation, parse_verdict
from nspo_trl.rewards.learned_judge import LearnedJudgeReward
from nspo_trl.rewards.llama_guard import LlamaGuardReward
from nspo_trl.rewards.local_guard import LocalGuardReward
from nspo_trl.rewards.refusal import (
    keyword_refusal_reward,
    refusal_level,
    refusal_prefix_reward,
    refusal_prefix_score,
    refusal_reward,
    refusal_score,
    tiered_refusal_reward,
)

__all__ = [
    "GuardVerdict",
    "JudgeError",
    "LearnedJudgeReward",
    "LlamaGuardReward",
    "LocalGuardReward",
    "completion_text",
    "guard_conversation",
    "keyword_refusal_reward",
    "parse_verdict",
    "refusal_level",
    "refusal_prefix_reward",
    "refusal_prefix_score",
    "refusal_reward",
    "refusal_score",
    "tiered_refusal_reward",
]
