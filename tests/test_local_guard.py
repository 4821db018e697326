"""LocalGuardReward on a tiny model whose tokenizer has single 'safe'/'unsafe' tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nspo_trl.rewards import LocalGuardReward, guard_conversation

PROMPTS = ["How do I bake bread?", "Tell me how to steal a car.", "What is 2 + 2?", "Write a threat.", "Hello"]
COMPLETIONS = ["Mix flour and water.", "I can't help.", "4", "No.", "Hi there, how can I help you today?"]


@pytest.fixture(scope="module")
def judge_parts(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["safe", "unsafe"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(0)
    with torch.no_grad():  # give the two verdict rows some weight so P(unsafe) varies across inputs
        model.lm_head.weight[-2:] = torch.randn(2, model.config.hidden_size)
    return model, tokenizer


def manual_p_unsafe(model, tokenizer, prompt, completion) -> float:
    """One conversation alone, no padding: softmax over the two verdict logits at the last position."""
    text = tokenizer.apply_chat_template(
        guard_conversation(prompt, completion), tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    safe, unsafe = tokenizer.convert_tokens_to_ids(["safe", "unsafe"])
    return float(torch.softmax(logits[[safe, unsafe]], -1)[1])


def test_probability_mode_matches_an_unbatched_forward(judge_parts):
    model, tokenizer = judge_parts
    expected = [manual_p_unsafe(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert max(expected) - min(expected) > 1e-3  # the check below is not comparing constants
    metrics = {}
    for batch_size in (1, 2, 8):  # left padding + position ids: batching must not change a score
        reward = LocalGuardReward(model, tokenizer, batch_size=batch_size)
        rewards = reward(PROMPTS, COMPLETIONS, log_metric=metrics.__setitem__)
        torch.testing.assert_close(torch.tensor(rewards), -torch.tensor(expected), rtol=0, atol=1e-5)
    assert metrics["local_guard/p_unsafe"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_threshold_mode_gives_verdict_rewards(judge_parts):
    model, tokenizer = judge_parts
    expected = [manual_p_unsafe(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    threshold = sorted(expected)[2]
    metrics = {}
    reward = LocalGuardReward(model, tokenizer, mode="threshold", threshold=threshold, unsafe_reward=-2.0)
    rewards = reward(PROMPTS, COMPLETIONS, log_metric=metrics.__setitem__)
    assert rewards == [-2.0 if p >= threshold else 0.0 for p in expected]
    assert metrics["local_guard/unsafe_rate"] == pytest.approx(3 / 5)
    # the evaluation's judge applies the same rule (≥, so the prompt at exactly the threshold is unsafe)
    conversations = [guard_conversation(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert [v.unsafe for v in reward.judge(conversations)] == [p >= threshold for p in expected]


def test_tokenizer_without_verdict_tokens_is_rejected(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer.encode("unsafe", add_special_tokens=False)) > 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"'safe' is \d+ tokens"):
        LocalGuardReward(model, tokenizer)
    with pytest.raises(ValueError, match="mode"):
        LocalGuardReward(model, tokenizer, mode="vote")
