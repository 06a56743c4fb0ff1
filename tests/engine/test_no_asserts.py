"""The engine validates with explicit exceptions: `assert` vanishes under `python -O`."""

from __future__ import annotations

import ast
from pathlib import Path

import k2ray.engine

ENGINE_DIR = Path(k2ray.engine.__file__).parent


def test_engine_has_no_assert_statements() -> None:
    found = [f"{path.name}:{node.lineno}" for path in sorted(ENGINE_DIR.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert not found, f"assert used in k2ray/engine: {found}"
