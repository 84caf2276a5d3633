"""The package's import graph has no cycle: the protocol below, the adapters above it.

Every ``import`` / ``from ... import`` of a ``budgetguard`` module counts, wherever it is
written (module top, inside a function, under ``TYPE_CHECKING``): a reader following any of
them must never come back to where they started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import budgetguard

PACKAGE = Path(budgetguard.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports. ``from pkg import sub`` names the module ``sub``
    (Python runs ``pkg/__init__`` first, but that is packaging, not a dependency); ``from
    mod import thing`` names ``mod``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in modules else module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(modules)
    return {name: {t for t in _imports(path, name, names) if t in names and t != name} for name, path in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    assert "budgetguard.engine" in edges and "budgetguard.metered" in edges
    cycle = _cycle({k: {t for t in v if t != "budgetguard"} for k, v in edges.items() if k != "budgetguard"})
    assert cycle is None, " -> ".join(cycle or ())


APPLICATIONS = {"budgetguard", "budgetguard.demo", "budgetguard.cli", "budgetguard.cli_report"}
"""The package's lazy re-exports and the programs built on the library: they sit above the façade."""


def test_lower_modules_never_import_the_facade() -> None:
    edges = graph()
    importers = sorted(k for k, v in edges.items() if "budgetguard.guard" in v and k not in APPLICATIONS)
    assert importers == [], f"only the package's re-exports and its programs may name the façade: {importers}"


def test_the_checker_finds_a_cycle_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

