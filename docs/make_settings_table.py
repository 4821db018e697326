"""Regenerate the settings table of ``docs/recipes.md`` from ``NSPOConfig``: every ``nspo_*`` field with
its type and default. A field's effect is kept as written in the page; a new field gets its ``help`` text.

    python docs/make_settings_table.py
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from nspo_trl.trainer.nspo_config import NSPOConfig

PAGE = Path(__file__).resolve().parent / "recipes.md"
START, END = "<!-- settings -->\n", "\n<!-- /settings -->"


def type_name(annotation) -> str:
    """``float | None`` as ``float \\| None``: a bare ``|`` would split the Markdown cell."""
    return str(annotation).replace("<class '", "").replace("'>", "").replace("typing.", "").replace(" | ", " \\| ")


def main() -> None:
    text = PAGE.read_text()
    head, rest = text.split(START, 1)
    table, tail = rest.split(END, 1)
    row = re.compile(r"^\| `(nspo_\w+)` \| `[^`]*` \| `[^`]*` \| (.*) \|$", re.M)
    effects = {m.group(1): m.group(2) for m in row.finditer(table)}
    hints = typing.get_type_hints(NSPOConfig)
    rows = ["| field | type | default | effect |", "|---|---|---|---|"]
    for field in dataclasses.fields(NSPOConfig):
        if field.name.startswith("nspo_"):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            effect = effects.get(field.name) or field.metadata.get("help", "")
            rows.append(f"| `{field.name}` | `{type_name(hints[field.name])}` | `{default!r}` | {effect} |")
    PAGE.write_text(head + START + "\n".join(rows) + END + tail)


if __name__ == "__main__":
    main()
