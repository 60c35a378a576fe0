"""The vLLM internals engine/vllm_internals.py relies on are where it read them (fast: the source is parsed, not imported)."""
from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

from engine.vllm_internals import READ_FROM, USED, Internal

VLLM = pathlib.Path(importlib.util.find_spec("vllm").origin).parent


def _names(owner: ast.AST) -> set[str]:
    """What `owner` defines: a class's attributes, methods and `self.` attributes; a function's parameters."""
    if isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)):
        arguments = owner.args
        return {arg.arg for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)}
    names = set()
    for node in owner.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    for node in ast.walk(owner):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(
            target.attr for target in targets
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        )
    return names


def _owner(tree: ast.Module, dotted: str) -> ast.AST:
    scope: ast.AST = tree
    for part in dotted.split("."):
        found = [node for node in scope.body if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == part]
        assert found, f"{part} is gone"
        scope = found[-1]
    return scope


@pytest.mark.parametrize("internal", USED, ids=lambda internal: f"{internal.owner}.{internal.name}")
def test_each_internal_is_still_where_it_was_read(internal: Internal):
    path = VLLM / internal.path
    assert path.exists(), f"vllm/{internal.path} is gone (read from vLLM {READ_FROM})"
    owner = _owner(ast.parse(path.read_text()), internal.owner)
    assert internal.name in _names(owner), (
        f"vllm/{internal.path} {internal.owner} no longer has {internal.name} (read from vLLM {READ_FROM}): "
        "update engine/vllm_internals.py"
    )


def test_the_internals_were_read_from_the_installed_vllm():
    """A different vLLM may keep the names and change what they mean: re-read them, then move READ_FROM."""
    [version] = [node.value.value for node in ast.parse((VLLM / "_version.py").read_text()).body
                 if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets)]
    assert version.split("+")[0] == READ_FROM


def test_the_checker_notices_a_missing_name():
    with pytest.raises(AssertionError, match="no longer has"):
        test_each_internal_is_still_where_it_was_read(Internal("v1/engine/llm_engine.py", "LLMEngine", "_no_such_attribute"))
    with pytest.raises(AssertionError, match="is gone"):
        test_each_internal_is_still_where_it_was_read(Internal("v1/engine/llm_engine.py", "NoSuchClass", "step"))
