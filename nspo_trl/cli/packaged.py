"""Recipes and accelerate configs shipped inside the package, found by name or by path.

``nspo-trl train qwen7b`` and ``--accelerate_config zero3`` name files of
``nspo_trl/recipes/*.yaml`` and ``nspo_trl/accelerate_configs/*.yaml`` (package data, so a plain
``pip install`` has them; the repository's top-level ``recipes/`` and ``accelerate_configs/`` are
links to the same folders). An existing path always wins over a shipped name.
"""

from __future__ import annotations

import difflib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # nspo_trl/
RECIPES_DIR = PACKAGE_DIR / "recipes"
ACCELERATE_CONFIGS_DIR = PACKAGE_DIR / "accelerate_configs"
SUFFIXES = (".yaml", ".yml")


def shipped(directory: Path) -> dict[str, Path]:
    """``{name: path}`` of the YAML files in ``directory``, sorted by name."""
    return {path.stem: path for path in sorted(directory.glob("*.yaml"))}


def shipped_recipes() -> dict[str, Path]:
    return shipped(RECIPES_DIR)


def shipped_accelerate_configs() -> dict[str, Path]:
    return shipped(ACCELERATE_CONFIGS_DIR)


def find(name_or_path: str | Path, directory: Path, field: str, listing: str) -> Path:
    """An existing file ``name_or_path``, else the shipped file of that name (suffix optional).

    Otherwise a one-line ``ValueError`` naming ``field``, the closest shipped name and the command
    that lists them.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(path.suffix)] if path.suffix in SUFFIXES else path.name
    available = shipped(directory)
    if str(name_or_path) in (name, f"{name}{path.suffix}") and name in available:
        return available[name]
    close = difflib.get_close_matches(name, list(available), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"{field}: {str(name_or_path)!r} is neither a file nor a shipped name; {hint}"
        f"shipped: {', '.join(available)} ({listing})."
    )


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the shipped recipe ``name_or_path`` (``qwen7b`` or ``qwen7b.yaml``)."""
    return find(name_or_path, RECIPES_DIR, "recipe", "nspo-trl recipes")


def accelerate_config_path(name_or_path: str | Path) -> Path:
    """An accelerate config file, or the shipped one named ``name_or_path`` (``zero3``)."""
    return find(name_or_path, ACCELERATE_CONFIGS_DIR, "accelerate_config", "nspo-trl recipes")


def headline(path: Path) -> str:
    """The first sentence of a shipped YAML file's opening comment (what the file is for)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#")
        if not line.startswith("#") or not text.strip() or text.startswith("  "):
            break  # the end of the first comment paragraph (or a command example)
        words += text.split()
    sentence = " ".join(words)
    end = sentence.find(". ")
    return sentence if end < 0 else sentence[: end + 1]
