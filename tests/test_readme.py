"""Every Python snippet in the README runs as written: it compiles, and uses no name it does not define or import."""

from __future__ import annotations

import ast
import builtins
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def bound_names(tree: ast.AST) -> set[str]:
    """Every name the snippet binds anywhere: imports, assignments, definitions, arguments, loop targets."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def imported_modules(tree: ast.AST) -> set[str]:
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return modules | {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{index}" for index in range(len(SNIPPETS))])
def test_each_snippet_compiles_and_defines_what_it_uses(snippet: str) -> None:
    tree = ast.parse(snippet)
    compile(tree, "README.md", "exec")
    defined = bound_names(tree) | set(dir(builtins))
    used = {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    assert used <= defined, f"undefined in the snippet: {sorted(used - defined)}\n{snippet}"


#: Snippets that would talk to the real API when run: compiled and checked above, not run.
NEEDS_THE_API = ('with OpenAIBatchHook("openai_default")',)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{index}" for index in range(len(SNIPPETS))])
def test_each_snippet_runs(snippet: str) -> None:
    """DAGs, operators and callbacks are built; functions are defined. Nothing may reach the network."""
    if any(marker in snippet for marker in NEEDS_THE_API):
        pytest.skip("talks to api.openai.com: compiled and checked for undefined names only")
    if missing := sorted(name for name in imported_modules(ast.parse(snippet)) if not installed(name)):
        pytest.skip(f"shows another package's API, not installed here: {missing}")
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme_snippet"})  # noqa: S102 - the point
