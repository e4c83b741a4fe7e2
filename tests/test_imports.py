"""The package's import graph has no cycle: no module under edgeprune/ imports (at module level, inside a
function or under TYPE_CHECKING) a module that imports it back, directly or through others."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgeprune"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, for every .py under the package (packages by their __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def strong_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated last) per strongly connected component."""
    return [_cycle_in(graph, set(c)) for c in strong_components(graph)]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_walker_sees_relative_local_and_type_checking_imports():
    graph = import_graph()
    assert "edgeprune.context" in graph["edgeprune.pipeline"]  # module level, relative
    assert "edgeprune.scoring" in graph["edgeprune.stages.score"]  # function-local
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph = import_graph()
    comps = strong_components(graph)
    lines = [f"{' -> '.join(_cycle_in(graph, set(c)))}   (modules in this knot: {', '.join(c)})" for c in comps]
    assert not comps, "import cycles (a module path that imports its way back):\n" + "\n".join(lines)


def test_scoring_and_saving_a_pruned_model_happen_in_the_stages_only():
    """Each stage has one implementation: the commands and the pipeline call the stages, which call
    ``score_model`` and ``save_pruned``; nobody else does (their own packages aside)."""
    owners = {"score_model": ("edgeprune.scoring", "edgeprune.stages"), "save_pruned": ("edgeprune.prune",
                                                                                        "edgeprune.stages")}
    found = []
    for module, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in owners and not module.startswith(owners[name]):
                    found.append(f"{module}:{node.lineno} calls {name}")
    assert not found, "\n".join(found)


# who may import whom: commands -> pipeline -> stages -> context -> libraries
LAYERS = {
    "edgeprune.commands": ("edgeprune.cli", "edgeprune.commands"),
    "edgeprune.pipeline": ("edgeprune.commands",),
    "edgeprune.stages": ("edgeprune.pipeline", "edgeprune.commands", "edgeprune.stages"),
    "edgeprune.context": ("edgeprune.pipeline", "edgeprune.commands", "edgeprune.stages"),
}


def test_dependencies_point_one_way():
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in sorted(deps)
             for layer, allowed in LAYERS.items()
             if (d == layer or d.startswith(layer + ".")) and not m.startswith(allowed)]
    assert not wrong, "imports against commands -> pipeline -> stages -> context -> libraries:\n" + "\n".join(wrong)
