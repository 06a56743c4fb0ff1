from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serve_process import ServeProcess, k2ray_serve

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bind_hub_kernels() -> None:
    """transformers (5.25 on) imports Hugging Face's `kernels` package, and the repo root (on sys.path for the
    `tests.*` imports) holds this project's kernels/ sources (installed as `k2ray.kernels`) under that same
    top-level name. Import Hugging Face's first, with the root off the path, so the name is bound to it."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != REPO_ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: nothing for the repo's kernels/ to shadow
    finally:
        sys.path[:] = saved


_bind_hub_kernels()

STOPS_K2RAY_SERVE = "stops_k2ray_serve"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The test that Ctrl-Cs the session's `k2ray serve` runs after every other test that uses it.
    items.sort(key=lambda item: STOPS_K2RAY_SERVE in item.keywords)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def k2ray_serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `k2ray serve` subprocess per session, as a user starts it (the README's snippets and the launcher
    test share it: each start is half a minute on two cores)."""
    pytest.importorskip("ray")
    with k2ray_serve(tmp_path_factory.mktemp("k2ray-serve")) as served:
        yield served
        if served.proc.poll() is None:
            served.interrupt()
