"""The package's layout: its import graph has no cycle, and imports point down (design.md, Layout).

Read from the source with ast, so imports inside functions count too; no module is imported.
"""
import ast
from pathlib import Path

import circuitsearch

PKG = Path(circuitsearch.__file__).parent


def module_names() -> dict[str, Path]:
    """circuitsearch.x.y -> its file (a package is its __init__.py)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative or absolute, at top level or in functions)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "circuitsearch":
                    target = node.module
                else:
                    continue
                for alias in node.names:  # `from . import toys` imports the module toys
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "circuitsearch"}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_read():
    g = import_graph()
    assert "circuitsearch.patching" in g["circuitsearch.algorithms.iterative"]
    assert "circuitsearch.toys" in g["circuitsearch.catalogue"]  # `from . import models, toys`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down():
    """cli -> sweeps -> runs -> algorithms -> patching -> models/tasks/graphs; config and evaluation stay below runs."""
    g = import_graph()
    for name, deps in g.items():
        ups = {d for d in deps if d == "circuitsearch.cli" or d.startswith("circuitsearch.runs")}
        if name != "circuitsearch.cli" and not name.startswith(("circuitsearch.runs", "circuitsearch.sweeps")):
            assert not ups, f"{name} imports {ups}: only the command line and sweeps/ import runs/, nothing imports cli"
        sweeps = {d for d in deps if d.startswith("circuitsearch.sweeps")}
        if name != "circuitsearch.cli" and not name.startswith("circuitsearch.sweeps"):
            assert not sweeps, f"{name} imports {sweeps}: only the command line imports sweeps/ (cli -> sweeps -> runs)"
        if name.startswith("circuitsearch.algorithms"):
            assert not deps & {"circuitsearch.evaluation", "circuitsearch.config"}, f"{name} imports upwards"
    assert not g["circuitsearch.models"] & {"circuitsearch.toys", "circuitsearch.catalogue"}
    rooms = [n for n in g if n.startswith("circuitsearch.evaluator.")]
    assert len(rooms) >= 7
    for name in rooms:  # the evaluator's rooms sit below its facade (patching) and the hooked path
        above = {d for d in g[name] if not d.startswith("circuitsearch.evaluator")} - {
            "circuitsearch.engine", "circuitsearch.metrics", "circuitsearch.readout", "circuitsearch.graphs.index",
            "circuitsearch.graphs.model_graph", "circuitsearch.tasks.base", "circuitsearch.tasks.slots"}
        assert not above, f"{name} imports {above}: the evaluator's rooms import only the engine, metrics and data"
