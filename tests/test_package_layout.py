"""The package's shape: no module hidden behind a function of the same name, no import cycle."""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import tl_taskmap

PACKAGE = Path(tl_taskmap.__file__).parent


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(tl_taskmap.__path__, "tl_taskmap.") if not m.name.endswith("__main__")]


def test_every_module_is_the_object_reached_by_attribute_access():
    shadowed = []
    for name in _modules():
        module = importlib.import_module(name)
        reached = functools.reduce(getattr, name.split(".")[1:], tl_taskmap)
        if reached is not module:
            shadowed.append(f"{name} -> {type(reached).__name__}")
    assert not shadowed, f"modules hidden behind a re-exported name: {shadowed}"


def _imports(path: Path, module: str) -> set[str]:
    """Every tl_taskmap module ``path`` imports, at module level or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tl_taskmap")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("tl_taskmap"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_no_import_cycle_inside_the_package():
    modules = set(_modules())
    graph = {}
    for name in modules:
        path = PACKAGE.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        # A package face (__init__) is where names are gathered, not a dependency of its submodules.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
    faces = {m for m in modules if PACKAGE.joinpath(*m.split(".")[1:]).is_dir()} | {"tl_taskmap"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt in faces:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state and start not in faces:
            visit(start, [start])
    assert not cycles, f"import cycles: {cycles}"
