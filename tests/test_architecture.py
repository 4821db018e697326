"""The package's layout is its architecture: each room imports only the rooms below it, and no module
imports itself back through others (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nspo_trl"
# each room, and the rooms it may import (besides itself); the order is the layering, lowest first
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "data": {"utils"},
    "models": {"utils", "data"},
    "nullspace": {"utils", "data"},
    "judge": {"utils", "data"},
    "rewards": {"utils", "data", "judge"},
    "eval": {"utils", "data", "models", "nullspace", "judge", "rewards"},
    "trainer": {"utils", "data", "nullspace"},
    "planning": {"utils", "data", "models", "nullspace", "trainer"},
    "cli": {"utils", "data", "models", "nullspace", "judge", "rewards", "eval", "trainer", "planning"},
}
ENTRY_POINTS = {"nspo_trl", "nspo_trl.train", "nspo_trl.eval.__main__", "nspo_trl.planning.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (lazy imports included, type-checking ones not)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {  # ``if TYPE_CHECKING:`` imports are annotations, not dependencies
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nspo_trl"):
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_every_module_lives_in_a_room():
    loose = [m for m in import_graph() if room(m) not in ALLOWED and m not in ENTRY_POINTS]
    assert not loose, f"modules outside the rooms of docs/architecture.md: {loose}"


def test_no_room_imports_a_room_above_it():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module not in ENTRY_POINTS
        for target in targets
        if room(target) != room(module) and room(target) not in ALLOWED[room(module)]
    )
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t in targets if t not in ENTRY_POINTS} for m, targets in import_graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError(" -> ".join(cycle))


def test_the_trainer_is_thin():
    lines = (PACKAGE / "trainer" / "nspo_trainer.py").read_text().count("\n")
    assert lines <= 250, f"nspo_trainer.py has {lines} lines: move what is not TRL glue to its room"
