"""The code's shape, checked so it stays readable: every module says what it is for, no
function runs past a screen, no class past a few. (The import rules between packages are
import-linter's, in `make test`.)"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
MAX_FUNCTION_LINES = 40
MAX_CLASS_LINES = 250
# Declarative tables, read top to bottom: longer is clearer than split.
DECLARATIVE = {
    "telemetry/metrics.py:Metrics.__init__": "one metric definition after another",
}


def _definitions() -> list[tuple[str, ast.AST, int]]:
    found: list[tuple[str, ast.AST, int]] = []
    for path in sorted(GATEWAY.rglob("*.py")):
        module = path.relative_to(GATEWAY).as_posix()
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, prefix: str, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    assert child.end_lineno is not None
                    found.append((f"{module}:{name}", child, child.end_lineno - child.lineno + 1))
                    visit(child, f"{name}.")

        visit(tree, "")
    return found


def test_no_function_or_class_is_too_long() -> None:
    too_long = []
    for name, node, lines in _definitions():
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if lines > limit and name not in DECLARATIVE:
            too_long.append(f"{name}: {lines} lines (at most {limit})")
    assert not too_long, "\n".join(too_long)


def test_declarative_exceptions_still_exist() -> None:
    names = {name for name, _, _ in _definitions()}
    assert set(DECLARATIVE) <= names, set(DECLARATIVE) - names


def test_every_module_says_what_it_is_for() -> None:
    silent = [
        path.relative_to(GATEWAY).as_posix()
        for path in sorted(GATEWAY.rglob("*.py"))
        if path.name != "__main__.py" and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not silent, silent
