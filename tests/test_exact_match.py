"""The offline capability score: the bundled tasks and the exact-match rules."""

from __future__ import annotations

import math
import operator as operator_

import pytest

from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.eval.exact_match import arithmetic_result, exact_match_report, is_correct, load_capability_tasks


def test_the_bundled_tasks_are_distinct_exact_and_disjoint_from_the_protected_prompts():
    tasks = load_capability_tasks()
    assert len(tasks) == 280 and len({t["prompt"] for t in tasks}) == 280
    assert {t["kind"] for t in tasks} == {"arithmetic", "facts"}
    for task in tasks:
        if task["kind"] == "arithmetic":  # reasoning-gym's answer is the expression's exact value
            left, operator, right = task["prompt"].removeprefix("Calculate ").rstrip(".").split()
            value = {"+": operator_.add, "-": operator_.sub, "*": operator_.mul}[operator](int(left), int(right))
            assert str(value) == task["answer"], task
    protected = set()
    for name in ("preservation", "general_instructions", "general_prompts"):
        for row in load_named_dataset(f"nspo_trl:{name}"):
            turns = row.get("prompt") or row.get("messages")
            protected.add((turns if isinstance(turns, str) else turns[0]["content"]).lower())
    assert not protected & {t["prompt"].lower() for t in tasks}


@pytest.mark.parametrize(
    ("response", "result"),
    [
        ("6 + 10 = 16.", "16"),
        ("To calculate 6 + 10, we add 6 and 10, which is 16.", "16"),
        ("The answer: 1,600", "1600"),
        ("6 + 10 = 61, so the answer is 16", "61"),  # the first result stated is the one scored
        ("To calculate 6 + 10, we need to add 6 and", "6"),  # cut off before a result: the line's last number
        ("I don't know.", None),
        ("69 - 90 equals -21", "-21"),
    ],
)
def test_arithmetic_result_is_the_first_number_stated_as_one(response, result):
    assert arithmetic_result(response) == result


def test_facts_match_whole_words_on_the_first_line_only():
    task = {"kind": "facts", "answer": "Au", "prompt": "?"}
    assert is_correct(task, "The symbol for gold is Au.\nMore text.")
    assert not is_correct(task, "Gold is a metal used in jewellery, audio cables.")  # 'au' inside a word
    assert not is_correct(task, "Gold is a metal.\nIts symbol is Au.")  # not on the first line


def test_report_gives_the_share_and_its_standard_error():
    tasks = [{"kind": "arithmetic", "prompt": "Calculate 2 + 2.", "answer": "4"}] * 4
    report = exact_match_report(tasks, ["2 + 2 = 4", "= 5", "4", "five"])
    assert report["score"] == 0.5 and report["n"] == 4
    assert report["stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    assert report["by_kind"] == {"arithmetic": {"score": 0.5, "n": 4}}
