"""One results file per benchmark: rows merged by key into ``results/NAME.json``, rendered to ``results/NAME.md``.

A benchmark run with other arguments (another size, backend or device) adds its row; run again with the same
arguments, it replaces it. ``benchmarks/README.md`` embeds ``NAME.md`` between ``<!-- results/NAME.md -->``
markers and ``tests/test_readme.py`` checks the two are byte for byte the same, so text and data agree.

    record("step_overhead", {"command": "...", "GRPO ms/step": "401.7", ...}, key=("command",))
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, row: dict[str, str], key: tuple[str, ...], results: Path = RESULTS) -> Path:
    """Merge ``row`` (column → formatted cell, in column order) into ``results/NAME.json`` and rewrite ``NAME.md``.

    A stored row with the same cells in the ``key`` columns is replaced; other rows stay in their order, a new
    one goes last. Every row of one file has the same columns: a changed benchmark starts a new file (delete the
    old one) rather than mix tables. Returns the Markdown file's path.
    """
    missing = [k for k in key if k not in row]
    if missing:
        raise ValueError(f"key columns {missing} are not in the row's columns {list(row)}")
    results.mkdir(parents=True, exist_ok=True)
    store = results / f"{name}.json"
    rows: list[dict] = json.loads(store.read_text()) if store.is_file() else []
    columns = list(row)
    for old in rows:
        if list(old["cells"]) != columns:
            raise ValueError(
                f"{store}: its rows have columns {list(old['cells'])}, this one {columns}; "
                "move the old file away to start a new table"
            )
    entry = {"cells": row, "recorded": date.today().isoformat()}
    matches = [i for i, old in enumerate(rows) if all(old["cells"][k] == row[k] for k in key)]
    if matches:
        rows[matches[0]] = entry
    else:
        rows.append(entry)
    store.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    table = results / f"{name}.md"
    table.write_text(render([r["cells"] for r in rows]))
    return table


def command() -> str:
    """The command line that ran this benchmark, as a Markdown code cell (``torchrun`` where it launched it)."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(RESULTS.parent.parent):
        script = script.relative_to(RESULTS.parent.parent)
    line = shlex.join([str(script), *sys.argv[1:]])
    launcher = (
        f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}"
        if "TORCHELASTIC_RUN_ID" in os.environ
        else "python"
    )
    return f"`{launcher} {line}`"


def device_name(device: str = "cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"`` on a GPU, ``"CPU, 2 threads"`` on a CPU: the device column of every table."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' * (threads > 1)}"


def render(rows: list[dict[str, str]]) -> str:
    """A Markdown table, one line per row, the columns of the first row."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
