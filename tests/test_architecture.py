"""The shape of the core: no import cycles inside musco_core (imports inside functions and TYPE_CHECKING blocks
count), and the plugin API module imports nothing from the core but its errors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "musco_core"


def core_imports(path: Path) -> set[str]:
    """The musco_core modules a module imports anywhere in its source (``musco_core`` itself for the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "musco_core":
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "musco_core":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    return {name: {target for target in core_imports(path) if target in modules and target != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_core_has_no_import_cycle():
    graph = {name: targets for name, targets in import_graph().items() if name != "__init__"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    graph = {path.stem: core_imports(path) for path in tmp_path.glob("*.py")}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])


@pytest.mark.parametrize("module, allowed", [("components", {"errors"}), ("errors", set()),
                                             ("hookspecs", set()), ("_version", set())])
def test_leaf_modules_import_only_what_they_may(module, allowed):
    assert import_graph()[module] <= allowed


def test_io_does_not_import_the_compressor():
    assert "compressor" not in import_graph()["io"]
