"""Reading and checking a training recipe before anything is loaded or written.

A recipe is a YAML mapping of fields of the three argument dataclasses of ``nspo_trl.cli.train`` (plus
TRL's optional ``env:`` mapping). Every problem becomes a ``ValueError`` whose one-line message
names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from nspo_trl.data.named_sets import DATA_FILE_BUILDERS


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"{key}: given twice (line {key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> dict:
    """The recipe's mapping, or a one-line ``ValueError`` naming the file (and line, where there is one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe: {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe: {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    try:
        recipe = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ValueError(f"recipe: {path} is not valid YAML{line}.") from None
    except ValueError as err:
        raise ValueError(f"recipe: {path}: {err}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe: {path} must be a YAML mapping of field: value.")
    return recipe


def check_recipe_fields(recipe: dict, dataclass_types) -> None:
    """Unknown keys (with the closest known field suggested) and values of the wrong type."""
    hints = {}
    for cls in dataclass_types:
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(cls)})
    for key, value in recipe.items():
        if key == "env":
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}: unknown recipe field{hint}")
        if not _matches(value, hints[key]):
            expected = str(hints[key]).replace("typing.", "")
            raise ValueError(f"{key}: {value!r} is not a valid {expected}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: {value!r} is not a finite number.")


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple) or annotation in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (typing.Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # enums and other rich types are checked by the dataclasses themselves


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(tuple(DATA_FILE_BUILDERS))


def check_paths(script_args, model_args) -> None:
    """Local files and directories named by the recipe must exist (Hub ids are left to the loaders)."""
    for field in ("dataset_name", "preservation_dataset_name"):
        value = getattr(script_args, field)
        if value and looks_like_path(value) and not Path(value).expanduser().exists():
            raise ValueError(f"{field}: {value} does not exist.")
    model = model_args.model_name_or_path
    if model and looks_like_path(model) and not script_args.build_tiny_model and not Path(model).expanduser().exists():
        raise ValueError(f"model_name_or_path: {model} does not exist (or set build_tiny_model: true).")
