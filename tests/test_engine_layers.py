"""The engine package's import layers (fast): the vLLM engine modules never import each other in a circle.

`engine.registry` alone chooses between this process's own engine (`engine.local`) and a client of the
host's shared engine core (`engine.host_client`); below it, imports go one way, in functions too.
"""
from __future__ import annotations

import ast
import pathlib

ENGINE = pathlib.Path(__file__).resolve().parent.parent / "engine"

# What each vLLM-facing module may import from the engine package (shared helpers below it, never a sibling above).
ALLOWED = {
    "local": {"api", "vllm_internals", "process", "model_staging", "prompts", "output", "compile_cache"},
    "host": {"api", "vllm_internals", "process", "output", "compile_cache"},
    "host_client": {"api", "vllm_internals", "host", "output"},
    "process": {"api"},
    "output": set(),
    "compile_cache": {"api"},
    "vllm_internals": set(),
    "fake": {"api"},
}


def _imports(module: str) -> set[str]:
    """engine.X modules `module` imports anywhere in its source (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse((ENGINE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "engine":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("engine."))
    return found


def test_engine_modules_import_only_what_is_below_them():
    assert {module: _imports(module) - allowed for module, allowed in ALLOWED.items()} == {module: set() for module in ALLOWED}


def test_no_engine_module_imports_in_a_circle():
    graph = {path.stem: _imports(path.stem) for path in ENGINE.glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})) for nxt in graph.get(start, ()))

    assert [module for module in graph if reaches(module, module, {module})] == []
