"""The prompt sets of the safety and over-refusal suites, loaded by dataset id or from a local file.

Each set is named on the command line as ``name`` (its Hub id below) or ``name=FILE`` (a local
``.jsonl``/``.json``/``.csv``/``.parquet`` in the same schema as the Hub set). Every set becomes
a list of :class:`EvalPrompt` (text and category):

| name | Hub id (config, split) | prompt column | category column | kept rows |
|---|---|---|---|---|
| ``pku_saferlhf`` | PKU-Alignment/PKU-SafeRLHF (test) | ``prompt`` | – | unique prompts with an unsafe response |
| ``jailbreakbench`` | JailbreakBench/JBB-Behaviors (behaviors, harmful) | ``Goal`` | ``Category`` | all |
| ``harmbench`` | walledai/HarmBench (standard, train) | ``prompt`` | ``category`` | all |
| ``advbench`` | walledai/AdvBench (train) | ``prompt`` | – | all |
| ``xstest`` | Paul/XSTest (train) | ``prompt`` | ``type`` | ``label == "safe"`` (over-refusal) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from nspo_trl.data.named_sets import DATA_FILE_BUILDERS, load_named_dataset, pku_saferlhf_prompts


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    """Where a benchmark lives and how its rows become prompts."""

    hub_id: str
    config: str | None
    split: str
    prompt_column: str
    category_column: str | None = None
    keep: Callable[[dict], bool] | None = None
    prepare: Callable[[Dataset], Dataset] | None = None


def _pku_harmful_prompts(dataset: Dataset) -> Dataset:
    prompts = pku_saferlhf_prompts(dataset, harmful_only=True)
    return Dataset.from_dict({"prompt": [p[0]["content"] for p in prompts["prompt"]]})


SAFETY_SETS: dict[str, PromptSet] = {
    "pku_saferlhf": PromptSet("PKU-Alignment/PKU-SafeRLHF", None, "test", "prompt", prepare=_pku_harmful_prompts),
    "jailbreakbench": PromptSet("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal", "Category"),
    "harmbench": PromptSet("walledai/HarmBench", "standard", "train", "prompt", "category"),
    "advbench": PromptSet("walledai/AdvBench", None, "train", "prompt"),
}
OVERREFUSAL_SETS: dict[str, PromptSet] = {
    "xstest": PromptSet("Paul/XSTest", None, "train", "prompt", "type", keep=lambda row: row["label"] == "safe"),
}


def parse_set_specs(specs: str, known: dict[str, PromptSet], field: str) -> dict[str, str | None]:
    """``"a,b=path"`` → ``{"a": None, "b": "path"}``; unknown names are a one-line error naming ``field``."""
    out: dict[str, str | None] = {}
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        name, _, path = spec.partition("=")
        if name not in known:
            raise ValueError(f"{field}: unknown set {name!r}; choose from {', '.join(known)} (optionally name=FILE).")
        if path and not Path(path).is_file():
            raise ValueError(f"{field}: {path} does not exist.")
        if path and Path(path).suffix not in DATA_FILE_BUILDERS:
            raise ValueError(f"{field}: {path}: use one of {', '.join(DATA_FILE_BUILDERS)}.")
        out[name] = path or None
    return out


def load_prompt_set(spec: PromptSet, path: str | None = None, limit: int | None = None) -> list[EvalPrompt]:
    """The set's prompts (from ``path`` when given, else from the Hub), at most ``limit`` of them, in order."""
    dataset = load_named_dataset(path) if path else load_named_dataset(spec.hub_id, spec.split, spec.config)
    if spec.prepare is not None:
        dataset = spec.prepare(dataset)
    missing = [c for c in (spec.prompt_column, spec.category_column) if c and c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path or spec.hub_id}: missing column(s) {missing}; expected the schema of {spec.hub_id}.")
    prompts = [
        EvalPrompt(row[spec.prompt_column], str(row[spec.category_column]) if spec.category_column else "")
        for row in dataset
        if spec.keep is None or spec.keep(row)
    ]
    return prompts[:limit] if limit else prompts
