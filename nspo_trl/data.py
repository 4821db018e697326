"""Data sets by name: the small sets bundled with the package, local files, or Hub ids.

``nspo_trl:<name>`` loads ``nspo_trl/resources/<name>.jsonl`` (written for this project):

- ``nspo_trl:safety_prompts``: 32 harmful and 32 benign conversational prompts, column
  ``is_harmful`` (for the rule-based refusal reward of smoke runs);
- ``nspo_trl:preservation``: 60 general-task conversations (arithmetic, code, instruction
  following) in ``messages`` layout, for building the null space.

Anything else goes to ``datasets.load_dataset`` unchanged (a Hub id, a local directory, or a
``.json``/``.jsonl``/``.parquet``/``.csv`` file).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from datasets import Dataset, load_dataset

BUNDLED_PREFIX = "nspo_trl:"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def bundled_path(name: str) -> Path:
    path = Path(str(resources.files("nspo_trl") / "resources" / f"{name}.jsonl"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise ValueError(f"dataset {BUNDLED_PREFIX}{name} is not bundled; available: {available}.")
    return path


def load_named_dataset(name: str, split: str = "train", config: str | None = None) -> Dataset:
    """Load ``name`` (bundled, local file or Hub id) and return ``split``."""
    if name.startswith(BUNDLED_PREFIX):
        return load_dataset("json", data_files=str(bundled_path(name.removeprefix(BUNDLED_PREFIX))), split="train")
    builder = _FILE_BUILDERS.get(Path(name).suffix)
    if builder is not None and Path(name).is_file():
        return load_dataset(builder, data_files=name, split="train")
    return load_dataset(name, config, split=split)
