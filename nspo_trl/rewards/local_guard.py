"""Llama Guard in-process with transformers, scored from next-token logits.

For each conversation the judge's chat template ends right before its verdict, so the next
token is ``safe`` or ``unsafe``. With ``z`` the logits of those two tokens at that position,

    P(unsafe) = softmax(z_safe, z_unsafe)[1]

and the reward is ``safe_reward + (unsafe_reward − safe_reward) · P(unsafe)`` (``mode="probability"``,
−P(unsafe) by default), or the verdict ``P(unsafe) ≥ threshold`` mapped like the server judge
(``mode="threshold"``). Batches are left-padded with explicit position ids, so a conversation
scores the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from nspo_trl.data.preservation import iter_batches
from nspo_trl.rewards.guard import GuardVerdict, guard_conversations, rewards_from_verdicts


class LocalGuardReward:
    """TRL reward from a Llama Guard model loaded in this process.

    Args:
        model: a model id/path or a loaded causal LM.
        tokenizer: its tokenizer (loaded from ``model`` when it is a path).
        mode: ``"probability"`` (continuous) or ``"threshold"``.
        threshold: P(unsafe) at or above which a completion is unsafe (``threshold`` mode; also the
            unsafe rate it logs).
        batch_size: conversations per forward pass.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        mode: Literal["probability", "threshold"] = "probability",
        threshold: float = 0.5,
        safe_reward: float = 0.0,
        unsafe_reward: float = -1.0,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = "auto",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if mode not in ("probability", "threshold"):
            raise ValueError(f"LocalGuardReward: mode must be 'probability' or 'threshold', got {mode!r}.")
        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        if tokenizer is None:
            raise ValueError("LocalGuardReward: pass the judge's tokenizer with a loaded model.")
        self.__name__ = "local_guard"
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer = tokenizer
        self.mode, self.threshold, self.batch_size = mode, threshold, batch_size
        self.safe_reward, self.unsafe_reward = safe_reward, unsafe_reward
        self.verdict_ids = [self._single_token(word) for word in ("safe", "unsafe")]

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"LocalGuardReward: {word!r} is {len(ids)} tokens for this tokenizer; a Llama Guard "
                             "tokenizer encodes each verdict word as one token.")  # fmt: skip
        return ids[0]

    @torch.no_grad()
    def unsafe_probability(self, conversations: Sequence[list[dict[str, str]]]) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
        ]
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out: list[float] = []
        # left padding: every row's verdict position is the last one
        for batch in iter_batches(encoded, self.batch_size, pad_id, left=True):
            mask = batch["attention_mask"].to(device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=positions
            ).logits[:, -1, self.verdict_ids]
            out += torch.softmax(logits.float(), dim=-1)[:, 1].tolist()
        return out

    def verdicts(self, probabilities: Sequence[float]) -> list[GuardVerdict]:
        """Unsafe where ``P(unsafe) ≥ threshold`` (no categories: the logits only give safe/unsafe)."""
        return [GuardVerdict(unsafe=p >= self.threshold) for p in probabilities]

    def judge(self, conversations: Sequence[list[dict[str, str]]]) -> list[GuardVerdict]:
        """Verdicts for judge-ready conversations (as :meth:`LlamaGuardReward.judge`, synchronously)."""
        return self.verdicts(self.unsafe_probability(conversations))

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs,
    ) -> list[float]:
        probabilities = self.unsafe_probability(guard_conversations(prompts, completions))
        verdicts = self.verdicts(probabilities)
        if self.mode == "threshold":
            return rewards_from_verdicts(verdicts, self.safe_reward, self.unsafe_reward, log_metric, "local_guard")
        if log_metric is not None and probabilities:
            log_metric("local_guard/unsafe_rate", sum(v.unsafe for v in verdicts) / len(verdicts))
            log_metric("local_guard/p_unsafe", sum(probabilities) / len(probabilities))
        return [self.safe_reward + (self.unsafe_reward - self.safe_reward) * p for p in probabilities]
