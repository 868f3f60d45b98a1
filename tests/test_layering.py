"""The package layering, read from the source: no package imports ``orchestration`` (the top),
``rollout`` imports no role, and the project's module-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # pure code in this process

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rollout", "learner", "actors", "reward_service", "orchestration")
ROLES = ("learner", "actors", "reward_service", "orchestration")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Project modules ``path`` imports (all of them, or only those run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known}


def test_no_package_imports_orchestration_and_rollout_imports_no_role():
    offenders = []
    for name, path in modules().items():
        top = name.split(".")[0]
        for m in imports(path, top_level_only=False):
            target = m.split(".")[0]
            if top != "orchestration" and target == "orchestration":
                offenders.append(f"{name} imports {m}")
            if top == "rollout" and target in ROLES:
                offenders.append(f"{name} imports {m}")
    assert not offenders, offenders


def test_module_level_imports_have_no_cycle():
    graph = {name: imports(path, top_level_only=True) for name, path in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt == node.rsplit(".", 1)[0]:
                continue  # a module and its own package's __init__
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_test_module_imports_another():
    """Shared test code lives in ``conftest.py`` and ``helpers.py`` modules (and other helper
    modules not named ``test_*``); a test module imported by another would run its tests'
    collection twice and tie the two together."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders
