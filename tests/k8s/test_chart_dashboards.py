"""The chart ships k2ray's own dashboards (k8s/grafana) and rules (k8s/prometheus), one source each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from .chart import ROOT, only, render

GRAFANA_DIR = ROOT / "k8s" / "grafana"
RULES_DIR = ROOT / "k8s" / "prometheus" / "rules"


def test_every_dashboard_becomes_a_sidecar_config_map():
    files = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    assert {f.name for f in files} >= {"k2ray-serving.json", "k2ray-billing.json"}
    config_maps = {name: doc for doc in render() if doc["kind"] == "ConfigMap" for name in doc["data"]}
    for path in files:
        doc = config_maps[path.name]
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(doc["data"][path.name]) == json.loads(path.read_text())


def test_the_prometheus_rule_holds_every_rule_group():
    groups = [group for path in sorted(RULES_DIR.glob("*.yaml")) for group in yaml.safe_load(path.read_text())]
    rule = only(render(), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"]["groups"] == groups
    assert {g["name"] for g in groups} == {"k2ray.recording", "k2ray.alerts"}


def test_the_chart_reads_the_one_source_of_dashboards_and_rules():
    chart = ROOT / "k8s" / "helm" / "k2ray"
    assert (chart / "dashboards").resolve() == (GRAFANA_DIR / "dashboards").resolve()
    assert (chart / "rules").resolve() == RULES_DIR.resolve()


def test_committed_dashboards_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(GRAFANA_DIR / "generate_dashboards.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_have_datasource_pool_and_replica_variables():
    for path in Path(GRAFANA_DIR / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", path.name
        assert {"pool", "replica"} <= variables.keys(), path.name
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
