"""``benchmarks/results_table.py``: the files the benchmarks write and the docs embed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from results_table import record, render


def row(device: str, ms: str) -> dict[str, str]:
    return {"command": "`python benchmarks/x.py`", "device": device, "ms/step": ms}


def test_rows_merge_by_key_and_the_table_is_rendered(tmp_path):
    record("x", row("CPU", "1.0"), key=("command", "device"), results=tmp_path)
    record("x", row("H100", "0.1"), key=("command", "device"), results=tmp_path)
    table = record("x", row("CPU", "2.0"), key=("command", "device"), results=tmp_path)  # replaces the CPU row
    assert table.read_text() == (
        "| command | device | ms/step |\n|---|---|---|\n"
        "| `python benchmarks/x.py` | CPU | 2.0 |\n| `python benchmarks/x.py` | H100 | 0.1 |\n"
    )
    stored = json.loads((tmp_path / "x.json").read_text())
    assert [r["cells"]["ms/step"] for r in stored] == ["2.0", "0.1"]
    assert all(r["recorded"] for r in stored)


def test_a_changed_table_is_refused_and_nothing_is_written(tmp_path):
    record("x", row("CPU", "1.0"), key=("command",), results=tmp_path)
    before = (tmp_path / "x.json").read_text()
    with pytest.raises(ValueError, match="move the old file away"):
        record("x", {"command": "`python benchmarks/x.py`", "seconds": "3"}, key=("command",), results=tmp_path)
    with pytest.raises(ValueError, match="key columns"):
        record("x", row("CPU", "1.0"), key=("backend",), results=tmp_path)
    assert (tmp_path / "x.json").read_text() == before


def test_a_pipe_in_a_cell_does_not_split_it():
    assert render([{"a": "x | y"}]) == "| a |\n|---|\n| x \\| y |\n"


def test_every_results_file_is_its_json_rendered():
    """What a benchmark recorded and the Markdown the docs embed cannot disagree."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    stores = sorted(p for p in results.glob("*.json") if (p.with_suffix(".md")).is_file())
    recorded = [p for p in stores if isinstance(json.loads(p.read_text()), list)]
    assert {p.stem for p in recorded} >= {"step_overhead", "projection_step", "distributed_projection"}
    for store in recorded:
        cells = [r["cells"] for r in json.loads(store.read_text())]
        assert store.with_suffix(".md").read_text() == render(cells), store.name
