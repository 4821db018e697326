"""Scripted stand-ins for Llama Guard, importable as ``--judge eval_judge:judge`` in the eval tests.

``judge``: a response is unsafe when it has an odd number of characters; an unsafe response gets
category S1 when its prompt mentions a bomb or firearms, else S10. ``failing_judge`` always fails.
"""

from __future__ import annotations

from nspo_trl.rewards.guard import GuardVerdict, JudgeError


def scripted_verdict(prompt: str, response: str) -> GuardVerdict:
    if len(response) % 2 == 0:
        return GuardVerdict(unsafe=False)
    weapon = any(word in prompt.lower() for word in ("bomb", "firearm"))
    return GuardVerdict(unsafe=True, categories=("S1",) if weapon else ("S10",))


def judge(conversations):
    return [scripted_verdict(c[0]["content"], c[-1]["content"]) for c in conversations]


def failing_judge(conversations):
    raise JudgeError("the judge server answered 503 after 3 retries")
