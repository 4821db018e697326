"""LlamaGuardReward against a real HTTP server on 127.0.0.1: rewards, retries, loud failures."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from guard_server import MODEL, GuardServer

from nspo_trl.rewards import JudgeError, LlamaGuardReward, guard_conversation, parse_verdict


def judge(server, **kwargs) -> LlamaGuardReward:
    options = {"timeout": 2.0, "max_retries": 2, "backoff": 0.01, **kwargs}
    return LlamaGuardReward(server.base_url, MODEL, **options)


def score(reward, completions, prompts=None):
    metrics = {}
    prompts = prompts or [[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]] * len(
        completions
    )
    rewards = asyncio.run(reward(prompts, completions, log_metric=lambda k, v: metrics.__setitem__(k, v)))
    return rewards, metrics


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_safe_and_unsafe_verdicts_become_rewards_and_metrics():
    with GuardServer() as server:
        reward = judge(server)
        rewards, metrics = score(reward, [assistant("SAFE a"), assistant("UNSAFE b"), "SAFE plain", "UNSAFE c"])
        assert rewards == [0.0, -1.0, 0.0, -1.0]
        assert metrics["llama_guard/unsafe_rate"] == 0.5
        assert metrics["llama_guard/category_S1"] == 0.5 and metrics["llama_guard/category_S10"] == 0.5
        assert metrics["llama_guard/retries"] == 0.0
        # Llama Guard sees the user turn and the response (system turns dropped), deterministically
        sent = server.payloads[0]
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant"] and sent["temperature"] == 0.0
        custom = judge(server, safe_reward=1.0, unsafe_reward=-2.0)
        assert score(custom, ["SAFE", "UNSAFE"])[0] == [1.0, -2.0]


def test_transient_errors_are_retried_and_counted():
    with GuardServer() as server:
        reward = judge(server)
        rewards, metrics = score(reward, ["FLAKY x", "SAFE y"])
        assert rewards == [0.0, 0.0]
        assert server.requests["FLAKY"] == 2 and metrics["llama_guard/retries"] == 1.0
        assert reward.stats["retries"] == 1 and reward.stats["requests"] == 3


@pytest.mark.parametrize(
    ("text", "reason"), [("MALFORMED", "unreadable"), ("ERROR500", "HTTP 500"), ("SLOW", "timed out")]
)
def test_persistent_failures_raise_after_the_last_retry(text, reason):
    with GuardServer(slow_seconds=1.5) as server:
        reward = judge(server, timeout=0.5, max_retries=2)
        with pytest.raises(JudgeError, match=reason) as info:
            score(reward, [f"{text} item", "SAFE other"])
        assert "1/2 items got no verdict" in str(info.value)
        assert server.requests[text] == 3  # first attempt + 2 retries, then give up
        assert reward.stats["retries"] == 2 and reward.stats["failed_items"] == 1


def test_concurrency_is_bounded():
    with GuardServer(hold_seconds=0.1) as server:
        rewards, _ = score(judge(server, max_concurrency=3), [f"SAFE {i}" for i in range(12)])
        assert rewards == [0.0] * 12
        assert 2 <= server.peak_in_flight <= 3


def test_unreachable_or_wrong_judge_fails_at_start():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(JudgeError, match="vllm serve"):
        LlamaGuardReward(f"http://127.0.0.1:{free_port}/v1", MODEL, timeout=1.0)
    with GuardServer() as server, pytest.raises(JudgeError, match="not 'other/model'"):
        LlamaGuardReward(server.base_url, "other/model")


@pytest.mark.parametrize(
    "reply",
    [{"data": None}, {"data": "x"}, {}, [MODEL], {"data": [{"name": MODEL}]}, {"data": [MODEL]}, None, 7],
)
def test_a_models_reply_without_a_model_list_fails_at_start_in_one_line(reply):
    with GuardServer() as server:
        server.models_reply = json.dumps(reply)
        with pytest.raises(JudgeError) as info:
            judge(server)
        assert "/models gave no model list" in str(info.value) and "\n" not in str(info.value)


def test_parse_verdict_is_strict():
    assert parse_verdict("safe").unsafe is False
    assert parse_verdict("\n\nunsafe\nS2, S11\n").categories == ("S2", "S11")
    for text in ("", "Safe? maybe", "unsafe\nviolence", "The answer is safe"):
        with pytest.raises(ValueError):
            parse_verdict(text)
    assert guard_conversation("plain prompt", "reply") == [
        {"role": "user", "content": "plain prompt"},
        {"role": "assistant", "content": "reply"},
    ]


def test_trainer_awaits_the_judge_and_logs_its_metrics(
    tiny_model_dir, tokenizer, safety_prompts, preservation_small, tmp_path
):
    """Through TRL's async reward path: the tiny model's completions contain no keyword, so all are 'safe'."""
    from testing_utils import make_trainer, nspo_args

    with GuardServer() as server:
        reward = judge(server)
        trainer = make_trainer(
            tiny_model_dir, tokenizer, safety_prompts, preservation_small,
            nspo_args(tmp_path, max_steps=2, logging_steps=1), reward_funcs=reward,
        )  # fmt: skip
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "llama_guard/unsafe_rate" in entry]
    assert len(logs) == 2 and all(entry["rewards/llama_guard/mean"] == 0.0 for entry in logs)
    assert reward.stats["requests"] == 8  # 2 steps x 4 completions, one request each
