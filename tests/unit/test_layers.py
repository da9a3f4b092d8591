"""Imports flow one way: `schemas` ← `infra` ← `workers` ← `streams`, with no cycles.

Checked from the source (every `import` and `from ... import`, also those inside functions),
so a shortcut taken in a hurry fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT

PACKAGES = ("schemas", "infra", "workers", "streams")
MAY_IMPORT = {
    "schemas": {"schemas"},
    "infra": {"infra"},
    "workers": {"schemas", "infra", "workers"},
    "streams": {"schemas", "infra", "workers", "streams"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, module: str) -> Iterator[tuple[str, bool]]:
    """(imported project module, whether the import runs when the module loads)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        at_load = id(node) in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, at_load
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}", at_load


def _project(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (a module, or the module of an imported name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_each_layer_imports_only_the_layers_below_it(package: str) -> None:
    modules = _modules()
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in modules.items() if module.split(".")[0] == package
        for name, _ in _imports(path, module)
        if (target := _project(name, modules)) is not None
        and target.split(".")[0] not in MAY_IMPORT[package]
    )
    assert wrong == []


def test_modules_import_each_other_without_cycles() -> None:
    """Only imports that run at load time count: a function-level import is how a module
    reaches one that imports it back, lazily and on purpose."""
    modules = _modules()
    graph = {m: {t for name, at_load in _imports(p, m) if at_load
                 and (t := _project(name, modules)) is not None and t != m}
             for m, p in modules.items()}
    cycles = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join([*path[path.index(node):], node]))
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []
