"""deploy/docker/Dockerfile builds the image the chart runs: on Ray's GPU image at the chart's Ray
version, with every source the project's packaging needs."""

from __future__ import annotations

import re

import pytest
import yaml

from .chart import CHART_DIR, ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_base_image_is_rays_gpu_image_at_the_charts_ray_version():
    instructions = _instructions()
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu", base)
    chart_ray = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["rayVersion"]
    assert args["RAY_VERSION"] == chart_ray
    (run,) = [arg for op, arg in instructions if op == "RUN"]
    assert '"ray[serve]==${RAY_VERSION}"' in run  # pip keeps the image's Ray


def test_every_source_the_package_needs_is_copied():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {project["project"]["readme"], "pyproject.toml"}
    needed |= {src.split("/")[0] for src in project["tool"]["setuptools"]["package-dir"].values()}
    copied = set()
    for op, arg in _instructions():
        if op == "COPY":
            sources = [word for word in arg.split() if not word.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in sources}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
