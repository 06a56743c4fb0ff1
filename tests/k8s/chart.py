"""Render the k2ray Helm chart with Helm's own engine (helm-python-sdk's bundled libhelm, no helm binary)
and pick manifests out of the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "k8s" / "helm" / "k2ray"
RELEASE = "demo"
NAMESPACE = "llm"


def render(values: dict[str, Any] | None = None, chart_dir: Path = CHART_DIR) -> list[dict[str, Any]]:
    """Every manifest a release named RELEASE in NAMESPACE would apply (NOTES.txt excluded)."""
    rendered = helm_python.Chart.load(chart_dir).render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def render_notes(values: dict[str, Any] | None = None) -> str:
    rendered = helm_python.Chart.load(CHART_DIR).render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [doc for doc in docs if doc["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, got {len(matching)}"
    return matching[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" or a worker group's name) -> its pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    return templates


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def container_env(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = template["spec"]["containers"]
    return {entry["name"]: entry for entry in container.get("env", [])}
