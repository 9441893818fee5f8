"""No import cycles in the library: merging/sources/ imports one way, counting imports made
inside functions too (a function-level import is how a cycle hides), and merging/ as a whole
has no cycle among its module-level imports."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "merging"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    if node.level == 0:
        return node.module
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, is_package: bool, node: ast.AST, known: set[str]) -> list[str]:
    """The merging modules an import statement loads: `from .x import y` is x, or x.y when
    y is itself a module; `import merging.a.b` is merging.a.b."""
    found = []
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _resolve(importer, is_package, node)
        if source is None:
            return []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.append(submodule if submodule in known else source)
    return [name for name in found if name in known and name != importer]


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Module -> the merging modules it imports (at module level; or anywhere, functions included)."""
    paths = modules()
    known = set(paths)
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        pending = [(node, False) for node in tree.body]
        while pending:
            node, in_function = pending.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (module_level_only and in_function):
                graph[name].update(_targets(name, is_package, node, known))
            inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            pending.extend((child, inside) for child in ast.iter_child_nodes(node))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state:
                cycle = visit(following)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def restricted(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    inside = {name for name in graph if name == prefix or name.startswith(prefix + ".")}
    return {name: graph[name] & inside for name in inside}


def test_sources_import_one_way_even_inside_functions():
    graph = restricted(import_graph(module_level_only=False), "merging.sources")
    assert {"merging.sources", "merging.sources.tensors", "merging.sources.lora"} <= set(graph)
    assert "merging.sources.tensors" in graph["merging.sources.lora"]  # the graph sees relative imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in merging/sources/: " + " -> ".join(cycle)


def test_the_readers_do_not_import_the_package_that_picks_them():
    graph = import_graph(module_level_only=False)
    for name in restricted(graph, "merging.sources"):
        if name != "merging.sources":
            assert "merging.sources" not in graph[name], f"{name} imports merging.sources (open_model)"


def test_merging_has_no_module_level_import_cycle():
    graph = import_graph(module_level_only=True)
    assert len(graph) > 20 and "merging.sources" in graph["merging.plan"]
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle in merging/: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
