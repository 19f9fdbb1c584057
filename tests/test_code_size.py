"""Issue #16's size limits for the cache and sweep packages: no function over 80 lines, no module
over 500 lines (small modules with one job each)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("moesim/cache", "moesim/sweep") for p in (ROOT / d).glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_module_and_function_sizes(path):
    src = path.read_text()
    assert len(src.splitlines()) <= 500, f"{path.name}: {len(src.splitlines())} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"


def test_the_limit_sees_these_packages():
    assert len(MODULES) >= 15
