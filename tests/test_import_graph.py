"""No import circles among epp's modules (architecture rule): the graph of top-level imports.

Imports inside functions (deliberately lazy) and under `if TYPE_CHECKING:` are not edges. A module
importing a package it lives in is not an edge either (Python runs the package first anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "epp").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if "_gen" in rel.parts:
            continue  # generated protobuf stubs
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        parts = (module if is_package else module.rpartition(".")[0]).split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        source = base + ("." + node.module if node.module else "")
    else:
        source = node.module or ""
    return [source, *(f"{source}.{a.name}" for a in node.names)]


def import_graph() -> dict[str, set[str]]:
    """module -> the epp modules its top-level statements import (and their parent packages)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        statements: list[ast.stmt] = []
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            statements.extend(node.body if isinstance(node, ast.If | ast.Try) else [node])
        for node in statements:
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(m, path.name == "__init__.py", node):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    explicit = i == len(parts)
                    if dep in mods and dep != m and (explicit or not m.startswith(dep + ".")):
                        graph[m].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_has_edges() -> None:
    graph = import_graph()
    assert "epp.datastore" in graph["epp.director"]
    assert "epp.scheduling.registry" in graph["epp.scheduling.config"]


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []
