"""Structural rules from DESIGN.md §1, checked on the source tree: layers import one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject's package-dir: kernels/ is k2ray.kernels).
PACKAGE_DIRS = {"k2ray": ROOT / "k2ray", "k2ray.kernels": ROOT / "kernels"}
MAX_MODULE_LINES = 400
MAX_MODEL_FILE_LINES = 800
MODEL_FILE = ROOT / "k2ray" / "model" / "deepseek_v3.py"
LOWER_LAYERS = {"k2ray/model/": ("k2ray.engine", "k2ray.dist", "k2ray.serve"),
                "k2ray/engine/": ("k2ray.dist", "k2ray.serve"),
                "k2ray/dist/": ("k2ray.serve",),
                # Used by serve only (DESIGN.md §1): they know neither the engine nor the Serve app.
                "k2ray/billing/": ("k2ray.engine", "k2ray.dist", "k2ray.serve", "k2ray.model"),
                "k2ray/tools/": ("k2ray.engine", "k2ray.dist", "k2ray.serve", "k2ray.model")}
PURE_PYTHON_DIRS = ("k2ray/api/", "k2ray/billing/", "k2ray/tools/")


def _modules() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS.values() for p in d.rglob("*.py"))


def _module_name(rel: str) -> str:
    """'kernels/bench/x.py' -> 'k2ray.kernels.bench.x'; a package's __init__.py names the package."""
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "kernels":
        parts = ["k2ray", *parts]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute modules a `from ... import` names, relative ones resolved against `module`."""
    if node.level == 0:
        return [node.module] if node.module else []
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    if node.module:
        base = [*base, node.module]
    # `from .. import serve` imports a submodule: keep each name as a candidate module too.
    return [".".join(base), *(".".join([*base, alias.name]) for alias in node.names)]


def _imported_modules(rel: str, source: str) -> set[str]:
    module, is_package = _module_name(rel), rel.endswith("__init__.py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(_resolve(node, module, is_package))
    return names


def _first(name: str) -> str:
    return name.split(".")[0]


def _layering_violations(rel: str, source: str) -> list[str]:
    imports = _imported_modules(rel, source)
    firsts = {_first(m) for m in imports}
    problems = []
    if not rel.startswith("k2ray/serve/") and firsts & {"ray", "fastapi", "starlette"}:
        problems.append(f"{rel}: ray/fastapi belong in k2ray/serve/")
    if rel.startswith("kernels/"):
        outside = sorted(m for m in imports if _first(m) == "k2ray" and not m.startswith("k2ray.kernels"))
        if outside:
            problems.append(f"{rel}: kernels must not import the rest of k2ray: {outside}")
    if rel.startswith(PURE_PYTHON_DIRS) and "torch" in firsts:
        problems.append(f"{rel}: {rel.split('/')[1]} is pure Python, no torch")
    for prefix, forbidden in LOWER_LAYERS.items():
        bad = sorted(m for m in imports if m.startswith(forbidden)) if rel.startswith(prefix) else []
        if bad:
            problems.append(f"{rel} imports a layer to its right: {bad}")
    return problems


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    assert not _layering_violations(rel, path.read_text())


@pytest.mark.parametrize(("rel", "source"), [
    ("k2ray/model/loader.py", "from ..serve import app"),
    ("k2ray/model/loader.py", "from .. import serve"),
    ("k2ray/engine/__init__.py", "from ..dist.pool import Pool"),
    ("k2ray/engine/sub/x.py", "from ...serve.args import ServeArgs"),
    ("kernels/bench/bench_kernels.py", "from ...model import args"),
    ("k2ray/api/x.py", "from . import torch_helpers\nimport torch"),
    ("k2ray/billing/ledger.py", "from ..serve.args import ServeArgs"),
    ("k2ray/billing/meter.py", "import torch"),
    ("k2ray/tools/local_index.py", "from k2ray.engine.llm import LLM"),
])
def test_relative_cross_layer_imports_are_caught(rel: str, source: str) -> None:
    assert _layering_violations(rel, source)


@pytest.mark.parametrize(("rel", "source"), [
    ("k2ray/serve/app.py", "from ..engine import LLM"),
    ("k2ray/model/quantize.py", "from .loader import MODULE_MAP"),
    ("kernels/w4a16_gemm.py", "from .int4_layout import dequantize_int4"),
    ("kernels/bench/bench_kernels.py", "from .. import w4a16_gemm"),
    ("k2ray/engine/llm.py", "from ..model.loader import load_model"),
])
def test_relative_imports_within_the_layer_order_pass(rel: str, source: str) -> None:
    assert not _layering_violations(rel, source)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    limit = MAX_MODEL_FILE_LINES if path == MODEL_FILE else MAX_MODULE_LINES
    num_lines = len(path.read_text().splitlines())
    assert num_lines <= limit, f"{path.relative_to(ROOT)} has {num_lines} lines (limit {limit}): split it by job"


def test_every_package_is_installed() -> None:
    """A sub-package missing from pyproject's explicit `packages` is absent from a wheel (the image)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "k2ray").rglob("__init__.py")}
    found |= {name for name in setuptools["package-dir"] if name != "k2ray"}
    assert found == set(setuptools["packages"])
