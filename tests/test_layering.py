"""The tree reads as the flow (docs/architecture.md, "The tree reads as the flow").

Every import between the project's modules, module-level or inside a function,
goes to the same package or one lower in `FLOORS`, and no modules import
each other in a circle. Read from the source with `ast`: nothing is imported.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
# Bottom first; docs/architecture.md draws the same order.
FLOORS = (
    "schemas", "library", "tiny_model", "engine", "tasks", "transforms", "configuration",
    "evaluation", "reporting", "pipelines", "launch", "benchmarks", "scripts",
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for floor in FLOORS for path in (REPO / floor).rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source (a `from package import module` counts the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_module_imports_a_higher_floor():
    rank = {floor: index for index, floor in enumerate(FLOORS)}
    upward = [
        f"{name} -> {target}"
        for name, targets in sorted(_graph().items())
        for target in sorted(targets)
        if rank[target.split(".")[0]] > rank[name.split(".")[0]]
    ]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_floors_cover_every_package():
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(FLOORS)
