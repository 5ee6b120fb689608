"""The source keeps the shape a maintainer can read: no module, class or function grows too big.

Issue 11's limits: no module in src/ over 800 lines, no class over 600, no
function over 80. A part that outgrows them is split along its concerns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cleveragents"
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 800, 600, 80
MODULES = sorted(SRC.rglob("*.py"))


def _too_long(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    problems = []
    if text.count("\n") > MODULE_LINES:
        problems.append(f"{path.name}: {text.count(chr(10))} lines > {MODULE_LINES}")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                problems.append(
                    f"{path.name}:{node.lineno}: {node.name} is {length} lines > {limit}"
                )
    return problems


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(SRC)))
def test_no_module_class_or_function_is_too_long(path: Path) -> None:
    assert _too_long(path) == []
