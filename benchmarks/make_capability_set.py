"""Write ``nspo_trl/resources/capability_tasks.jsonl``: the offline capability set with exact answers.

Two kinds of items, each with one exact answer:

- ``arithmetic``: the first 200 distinct problems from reasoning-gym's ``basic_arithmetic`` generator (Apache-2.0): two
  terms of 1-2 digits, ``+``, ``-`` or ``*``, no parentheses or negation, seed 7;
- ``facts``: 80 short questions with one-word answers (capitals, chemical symbols, ...), written for this
  project, none of them in the preservation or drift prompts.

reasoning-gym's package root imports many dependencies, so this script runs once, in an environment
of its own, and its output is shipped; the project never imports reasoning-gym:

    python3 -m venv /tmp/rg && /tmp/rg/bin/pip install reasoning-gym==0.1.25
    /tmp/rg/bin/python benchmarks/make_capability_set.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "nspo_trl" / "resources" / "capability_tasks.jsonl"
ARITHMETIC_SEED, ARITHMETIC_ITEMS = 7, 200
FACTS = [
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Greece?", "Athens"), ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Finland?", "Helsinki"), ("What is the capital of Denmark?", "Copenhagen"),
    ("What is the capital of Poland?", "Warsaw"), ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Hungary?", "Budapest"), ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Belgium?", "Brussels"), ("What is the capital of the Netherlands?", "Amsterdam"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of China?", "Beijing"),
    ("What is the capital of South Korea?", "Seoul"), ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of Vietnam?", "Hanoi"), ("What is the capital of Indonesia?", "Jakarta"),
    ("What is the capital of the Philippines?", "Manila"), ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Chile?", "Santiago"), ("What is the capital of Colombia?", "Bogota"),
    ("What is the capital of Venezuela?", "Caracas"), ("What is the capital of Cuba?", "Havana"),
    ("What is the capital of Turkey?", "Ankara"), ("What is the capital of Iran?", "Tehran"),
    ("What is the capital of Iraq?", "Baghdad"), ("What is the capital of Saudi Arabia?", "Riyadh"),
    ("What is the capital of Nigeria?", "Abuja"), ("What is the capital of Ethiopia?", "Addis Ababa"),
    ("What is the capital of Ghana?", "Accra"), ("What is the capital of Morocco?", "Rabat"),
    ("What is the capital of the United Kingdom?", "London"), ("What is the capital of Switzerland?", "Bern"),
    ("What is the capital of the Czech Republic?", "Prague"), ("What is the capital of Romania?", "Bucharest"),
    ("What is the capital of Ukraine?", "Kyiv"), ("What is the capital of Pakistan?", "Islamabad"),
    ("What is the capital of Bangladesh?", "Dhaka"), ("What is the capital of New Zealand?", "Wellington"),
    ("What is the chemical symbol for lead?", "Pb"), ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for iron?", "Fe"), ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for oxygen?", "O"), ("What is the chemical symbol for carbon?", "C"),
    ("What is the chemical symbol for potassium?", "K"), ("What is the chemical symbol for helium?", "He"),
    ("How many days are in a week?", "7"), ("How many months are in a year?", "12"),
    ("How many legs does an insect have?", "6"), ("How many sides does an octagon have?", "8"),
    ("How many sides does a triangle have?", "3"), ("How many minutes are in an hour?", "60"),
    ("How many hours are in a day?", "24"), ("How many seconds are in a minute?", "60"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("How many players are on a soccer team on the field?", "11"),
    ("How many strings does a standard guitar have?", "6"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and white?", "pink"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("What is the largest mammal?", "blue whale"),
    ("What is the closest star to Earth?", "Sun"), ("What planet is known as the Red Planet?", "Mars"),
    ("Which planet has the most prominent rings?", "Saturn"),
    ("What is the smallest planet in the solar system?", "Mercury"),
    ("Who painted The Starry Night?", "Van Gogh"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who developed the theory of relativity?", "Einstein"), ("What language is spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "yen"), ("What is the currency of the United Kingdom?", "pound"),
    ("What is the hardest natural substance?", "diamond"), ("What is the longest river in Africa?", "Nile"),
    ("What is the tallest mountain in the world?", "Everest"), ("On which continent is Egypt?", "Africa"),
    ("What is the opposite of hot?", "cold"), ("What is the plural of goose?", "geese"),
]  # fmt: skip


def arithmetic() -> list[dict]:
    from reasoning_gym.arithmetic.basic_arithmetic import BasicArithmeticDataset, BasicArithmeticDatasetConfig

    config = BasicArithmeticDatasetConfig(
        min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-", "*"), allow_parentheses=False,
        allow_negation=False, seed=ARITHMETIC_SEED, size=4 * ARITHMETIC_ITEMS,
    )  # fmt: skip
    items: dict[str, dict] = {}  # the first ARITHMETIC_ITEMS distinct problems, in the generator's order
    for item in BasicArithmeticDataset(config):
        row = {"prompt": item["question"], "answer": item["answer"], "kind": "arithmetic"}
        items.setdefault(item["question"], row)
    return list(items.values())[:ARITHMETIC_ITEMS]


def main() -> None:
    seen = set()
    for name in ("general_instructions", "general_prompts", "preservation", "safety_prompts"):
        for line in (ROOT / "nspo_trl" / "resources" / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            turns = row.get("prompt") or row.get("messages")
            seen.add((turns if isinstance(turns, str) else turns[0]["content"]).strip().lower())
    facts = [{"prompt": q, "answer": a, "kind": "facts"} for q, a in FACTS]
    clash = [f["prompt"] for f in facts if f["prompt"].lower() in seen]
    if clash:
        raise SystemExit(f"capability items also in the preservation or drift prompts: {clash}")
    items = arithmetic() + facts
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
