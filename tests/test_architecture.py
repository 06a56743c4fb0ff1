"""Structural rules from DESIGN.md §1, checked on the source tree: layers import one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"k2ray": ROOT / "k2ray", "kernels": ROOT / "kernels"}
MAX_MODULE_LINES = 400
MAX_MODEL_FILE_LINES = 800
MODEL_FILE = ROOT / "k2ray" / "model" / "deepseek_v3.py"


def _modules() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS.values() for p in d.rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module)
    return roots


def _first(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    imports = _imported_roots(path)
    firsts = {_first(m) for m in imports}
    if not rel.startswith("k2ray/serve/"):
        assert not firsts & {"ray", "fastapi", "starlette"}, f"{rel}: ray/fastapi belong in k2ray/serve/"
    if rel.startswith("kernels/"):
        outside = sorted(m for m in imports if _first(m) == "k2ray" and not m.startswith("k2ray.kernels"))
        assert not outside, f"{rel}: kernels must not import the rest of k2ray: {outside}"
    if rel.startswith("k2ray/api/"):
        assert "torch" not in firsts, f"{rel}: k2ray/api is pure Python"
    lower_layers = {"k2ray/model/": ("k2ray.engine", "k2ray.dist", "k2ray.serve"),
                    "k2ray/engine/": ("k2ray.dist", "k2ray.serve"),
                    "k2ray/dist/": ("k2ray.serve",)}
    for prefix, forbidden in lower_layers.items():
        if rel.startswith(prefix):
            bad = sorted(m for m in imports if m.startswith(forbidden))
            assert not bad, f"{rel} imports a layer to its right: {bad}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    limit = MAX_MODEL_FILE_LINES if path == MODEL_FILE else MAX_MODULE_LINES
    num_lines = len(path.read_text().splitlines())
    assert num_lines <= limit, f"{path.relative_to(ROOT)} has {num_lines} lines (limit {limit}): split it by job"
