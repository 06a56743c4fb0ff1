"""Two rules for k2ray/serve, checked on its source: time-outs of asyncio waits are caught as
`asyncio.TimeoutError` (on Python 3.10 it is not the builtin TimeoutError that `except TimeoutError`
catches), and no `assert` does control flow (python -O strips them)."""

from __future__ import annotations

import ast
from pathlib import Path

import k2ray.serve

SERVE_DIR = Path(k2ray.serve.__file__).parent
ASYNCIO_WAITS = {"wait_for", "timeout", "timeout_at"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(path.name, ast.parse(path.read_text())) for path in sorted(SERVE_DIR.rglob("*.py"))]


def _is_asyncio_wait(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ASYNCIO_WAITS and ast.unparse(node.func.value) == "asyncio")


def _awaits_with_timeout(body: list[ast.stmt]) -> bool:
    return any(_is_asyncio_wait(node) for stmt in body for node in ast.walk(stmt))


def _caught_names(handler: ast.ExceptHandler) -> list[str]:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return [ast.unparse(t) for t in types if t is not None]


def test_asyncio_time_outs_are_caught_as_asyncio_timeout_error() -> None:
    wrong = []
    for name, module in _modules():
        for node in ast.walk(module):
            if isinstance(node, ast.Try) and _awaits_with_timeout(node.body):
                caught = [n for handler in node.handlers for n in _caught_names(handler)]
                if "TimeoutError" in caught and "asyncio.TimeoutError" not in caught:
                    wrong.append(f"{name}:{node.lineno}")
    assert not wrong, f"catch asyncio.TimeoutError around asyncio waits: {wrong}"


def test_no_assert_in_the_serving_code() -> None:
    asserts = [f"{name}:{node.lineno}" for name, module in _modules() for node in ast.walk(module)
               if isinstance(node, ast.Assert)]
    assert not asserts, f"raise a real error instead: {asserts}"
