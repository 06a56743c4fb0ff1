"""Kernel tests run the real Triton kernels: compiled on CUDA, or on CPU under Triton's interpreter.

Triton picks the interpreter when each `@triton.jit` decorator runs, including its own standard library
(`tl.sum`, `tl.cdiv`), so TRITON_INTERPRET=1 must be set before `import triton`. This conftest sets it at
import. When another test package imported Triton earlier in the same pytest process, the CPU kernel tests are
delegated: they run once in a child pytest (fresh interpreter, variable set first) and each test here reports
the child's outcome for its own node id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

RESULTS_ENV = "K2RAY_KERNEL_TEST_RESULTS"  # set in the child: where to write {node id: [outcome, text]}
CHILD_TIMEOUT_S = 900


def _interpreter_active() -> bool:
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    standard = importlib.import_module("triton.language.standard")
    # import_module, not attribute access: the package re-exports launchers named like their modules.
    store = importlib.import_module("k2ray.kernels.kv_store")
    return isinstance(standard.cdiv, InterpretedFunction) and isinstance(
        store.store_latent_kv_kernel, InterpretedFunction
    )


def _must_delegate(item: pytest.Item) -> bool:
    return not HAS_CUDA and "gpu" not in item.keywords and not _interpreter_active()


@pytest.fixture
def kernel_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def _run_child(session: pytest.Session) -> dict[str, list[str]]:
    here = Path(__file__).parent
    node_ids = [i.nodeid for i in session.items if here in i.path.parents and "gpu" not in i.keywords]
    fd, name = tempfile.mkstemp(prefix="k2ray-kernel-tests-", suffix=".json")
    os.close(fd)
    out = Path(name)
    env = {**os.environ, "TRITON_INTERPRET": "1", RESULTS_ENV: str(out)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *node_ids]
    proc = subprocess.run(
        cmd, cwd=session.config.rootpath, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    try:
        results = json.loads(out.read_text() or "{}")
    finally:
        out.unlink(missing_ok=True)
    return results or {"<child>": ["failed", proc.stdout[-4000:] + proc.stderr[-4000:]]}


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not _must_delegate(pyfuncitem):
        return None
    session = pyfuncitem.session
    results = getattr(session, "_k2ray_kernel_results", None)
    if results is None:
        results = _run_child(session)
        session._k2ray_kernel_results = results
    if pyfuncitem.nodeid not in results:
        pytest.fail(f"interpreter child did not report this test: {next(iter(results.values()))[1]}")
    outcome, text = results[pyfuncitem.nodeid]
    if outcome == "failed":
        pytest.fail(f"failed under TRITON_INTERPRET=1 in a child pytest:\n{text}")
    if outcome == "skipped":
        pytest.skip(f"skipped in the interpreter child: {text}")
    return True


_child_results: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if RESULTS_ENV not in os.environ:
        return
    if report.failed:  # a failing setup, call or teardown fails the test
        _child_results[report.nodeid] = ["failed", report.longreprtext]
    elif report.skipped:
        _child_results[report.nodeid] = ["skipped", report.longreprtext]
    elif report.when == "call":
        _child_results.setdefault(report.nodeid, ["passed", ""])


def pytest_sessionfinish(session: pytest.Session) -> None:
    if RESULTS_ENV in os.environ:
        Path(os.environ[RESULTS_ENV]).write_text(json.dumps(_child_results))
