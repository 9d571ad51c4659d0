"""The package's import graph: no loops, and the shared machinery never reaches up.

Every module under selfalign/ is parsed with `ast` (nothing is imported), and every import counts,
including the lazy ones inside functions: a lazy import is still an arrow, it only hides the loop
from Python's import machinery.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "selfalign"
# Layers above core: core may import none of them.
HIGHER = ("selfalign.methods", "selfalign.evals", "selfalign.stages", "selfalign.cli",
          "selfalign.export", "selfalign.chat_cli", "selfalign.serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The known module `name` refers to: itself, or the nearest package above it."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every selfalign module `module` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import name` imports the submodule pkg.name when there is one.
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for target in targets:
            if not target.startswith("selfalign"):
                continue
            resolved = _resolve(target, known)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to the parents, too.
    for module in list(graph):
        for target in list(graph[module]):
            parent = target.rpartition(".")[0]
            while parent:
                if parent in known and parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (first == last) per loop of the graph (strongly connected component)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's algorithm
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in order:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for start in sorted(graph):
        if start not in order:
            strongconnect(start)

    cycles = []
    for component in components:
        start = min(component)
        # The shortest way back to `start` inside the component (breadth first).
        came_from = {start: None}
        frontier = [start]
        path = None
        while frontier and path is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & component):
                    if nxt == start:
                        path = [node]
                        break
                    if nxt not in came_from:
                        came_from[nxt] = node
                        following.append(nxt)
                if path:
                    break
            frontier = following
        while came_from[path[-1]] is not None:
            path.append(came_from[path[-1]])
        cycles.append([start] + path[::-1][1:] + [start])
    return cycles


def test_the_parser_sees_lazy_imports():
    # A self-check, so that an empty graph cannot pass the tests below.
    graph = _graph()
    assert "selfalign.core.store" in graph["selfalign.core.pipeline"]
    assert any(graph[m] for m in graph if m.startswith("selfalign.methods."))


def test_the_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_core_imports_nothing_from_the_layers_above():
    graph = _graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items() if module.startswith("selfalign.core")
        for target in targets if any(target == h or target.startswith(h + ".") for h in HIGHER)
    )
    assert not upward, "core reaches up:\n" + "\n".join(upward)


def test_stages_declare_their_report_parts_through_the_public_api():
    # report.py owns the HTML; methods and evals hand it values through selfalign.core.report_api
    graph = _graph()
    reaching = sorted(m for m, targets in graph.items() if m.startswith(("selfalign.methods", "selfalign.evals"))
                      and "selfalign.core.report" in targets)
    assert not reaching, f"import selfalign.core.report_api instead: {reaching}"
