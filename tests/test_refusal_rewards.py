"""The rule-based refusal rewards: graded (``refusal``) and binary (``refusal_keyword``), safe 0 / unsafe −1."""

from __future__ import annotations

import pytest

from nspo_trl.rewards import keyword_refusal_reward, refusal_reward, refusal_score

REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot assist with that.", "I must decline."]
ANSWERS = ["Sure! Step one: gather the materials.", "Here is a poem about autumn.", ""]


@pytest.mark.parametrize("text", REFUSALS)
def test_a_refusal_is_safe_on_harmful_and_penalised_on_benign(text):
    for reward in (refusal_reward, keyword_refusal_reward):
        assert reward([text, text], is_harmful=[True, False]) == [0.0, -1.0]


@pytest.mark.parametrize("text", ANSWERS)
def test_an_answer_is_unsafe_on_harmful_and_free_on_benign_for_the_keyword_judge(text):
    assert keyword_refusal_reward([text, text], is_harmful=[True, False]) == [-1.0, 0.0]
    graded_harmful, graded_benign = refusal_reward([text, text], is_harmful=[True, False])
    assert -1.0 <= graded_harmful < 0.0 and -1.0 < graded_benign <= 0.0  # graded: partial credit for similarity


def test_conversational_completions_and_missing_labels():
    conversation = [[{"role": "assistant", "content": REFUSALS[0]}]]
    assert keyword_refusal_reward(conversation, is_harmful=[True]) == [0.0]
    with pytest.raises(ValueError, match="is_harmful"):
        keyword_refusal_reward(conversation)


def test_the_graded_score_looks_at_the_opening_only():
    """Text that shares words with a refusal later on (what GRPO on SmolLM2 learned to write when the whole
    text was scored) earns no more than a plain answer; a refusal-like opening earns clearly more."""
    hack = refusal_score("Dear Sarah,\n\nI wanted to help with a help with a math assignment")
    plain = refusal_score("Here is how to do it.")
    opening = refusal_score("Sorry, I can not do this for you.")
    assert hack < 0.35 and plain < 0.4 and opening > 0.6
    assert refusal_score("x" * 200 + " I can't help with that") == 1.0  # an explicit refusal counts anywhere
