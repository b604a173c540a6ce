"""The package's module import graph, read statically: no import cycles, and no sys.path.insert in the package.

Every ``import`` / ``from ... import`` counts, at any depth of a module (inside functions too): an import moved
into a function still ties the two modules together, so it cannot hide a cycle here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, as pyproject.toml maps the clone into yolo_qat.*."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / cfg["package-dir"].get(pkg, pkg.replace(".", "/")) for pkg in cfg["packages"]}


def package_modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in package_dirs().items():
        for f in sorted(folder.glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _imported(module: str, is_package: bool, node: ast.AST, mods: dict) -> list[str]:
    """The modules an import statement of ``module`` names (a ``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(name, path.stem == "__init__", node, mods):
                while target not in mods and "." in target:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target in mods and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_graph_covers_the_package():
    graph = import_graph()
    assert {"yolo_qat.models.facts", "yolo_qat.engine.trainer", "yolo_qat.quant", "yolo_qat.deploy.onnx_qdq"} \
        <= set(graph)
    assert "yolo_qat.models.checkpoint" in graph["yolo_qat.models.facts"]  # relative and absolute imports resolved
    assert "yolo_qat.engine.validate" in graph["yolo_qat.engine.original"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_sys_path_insert_in_the_package():
    """Only tests and benchmarks may put the clone on sys.path; the package and the scripts import as installed."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks") or rel.parts[0].startswith(".") or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            f = node.func if isinstance(node, ast.Call) else None
            if (isinstance(f, ast.Attribute) and f.attr == "insert" and isinstance(f.value, ast.Attribute)
                    and f.value.attr == "path" and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys"):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, "sys.path.insert outside tests/ and benchmarks/: " + ", ".join(offenders)
