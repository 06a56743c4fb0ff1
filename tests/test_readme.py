"""Every snippet in README.md runs: the Python blocks and the curl commands, the HTTP ones against a real
`k2ray serve` (its URL in place of the README's http://127.0.0.1:8000)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_BASE_URL = "http://127.0.0.1:8000"
SNIPPET_TIMEOUT_S = 300.0
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Shell lines the README shows but this test does not run: they set up the venv, run this very suite, or
# run a benchmark for minutes, or need docker and a Kubernetes cluster (tests/k8s renders the chart instead;
# `printf` writes a cluster Secret's file there).
NOT_RUN = ("make ", ".venv/bin/python load_tests/", ".venv/bin/python -m k2ray.kernels.bench",
           ".venv/bin/python -m pytest ", "docker build ", "kubectl ", "helm ", "printf ")


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def _shell_commands() -> list[str]:
    """The README's shell lines, continuation lines joined."""
    commands = []
    for body in _blocks("bash"):
        lines = (c.strip() for c in body.replace("\\\n", " ").splitlines())
        commands += [c for c in lines if c and not c.startswith("#")]  # comments are not commands
    return commands


PYTHON_SNIPPETS = _blocks("python")
CURL_COMMANDS = [c for c in _shell_commands() if c.startswith("curl ")]


def _with_server(snippet: str, request: pytest.FixtureRequest) -> str:
    if README_BASE_URL not in snippet:
        return snippet
    return snippet.replace(README_BASE_URL, request.getfixturevalue("k2ray_serve_process").base_url)


def test_readme_has_the_snippets_this_test_runs():
    assert len(PYTHON_SNIPPETS) >= 2 and CURL_COMMANDS
    unknown = [c for c in _shell_commands() if not c.startswith(("curl ", *NOT_RUN))]
    assert not unknown, f"shell lines in README.md that no test runs: {unknown}"


def test_readme_lists_the_demo_models_tools_exactly():
    """The ```json block near the top: the schemas clients declare, one a line, as k2ray/demo defines them."""
    from k2ray.demo.tools import CLIENT_TOOLS

    listed = [json.loads(line) for body in _blocks("json") for line in body.splitlines() if line.strip()]
    assert listed == list(CLIENT_TOOLS.values())


@pytest.mark.slow
@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS, ids=lambda s: s.splitlines()[0][:40])
def test_python_snippet_runs(snippet: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _with_server(snippet, request)], capture_output=True,
                            text=True, timeout=SNIPPET_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the snippet prints its result"


@pytest.mark.slow
@pytest.mark.parametrize("command", CURL_COMMANDS, ids=lambda c: c.split()[2][:40])
def test_curl_command_runs(command: str, request: pytest.FixtureRequest) -> None:
    result = subprocess.run(["bash", "-c", _with_server(command, request)], capture_output=True, text=True,
                            timeout=SNIPPET_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["choices"][0]["message"]["content"] is not None, body
