"""Scraping Ray's metrics port, and the places dashboards and alert rules plug into (off by default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .chart import CHART_DIR, kinds, only, pod_templates, render


def test_pod_monitor_scrapes_every_ray_pod_of_the_release_on_the_metrics_port():
    docs = render()
    monitor = only(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's selector
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
            "targetLabel": "ray_io_cluster"} in endpoint["relabelings"]
    rayservice = only(docs, "RayService")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for name, template in pod_templates(rayservice).items():
        assert selector.items() <= template["metadata"]["labels"].items(), name
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080
    cluster = rayservice["spec"]["rayClusterConfig"]
    params = [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]
    assert {p["metrics-export-port"] for p in params} == {"8080"}


def test_dashboards_and_rules_can_be_turned_off():
    values = {"metrics": {"dashboards": {"enabled": False}, "prometheusRule": {"enabled": False}}}
    assert {"ConfigMap", "PrometheusRule"} <= set(kinds(render()))
    assert not {"ConfigMap", "PrometheusRule"} & set(kinds(render(values)))


def test_dashboard_files_become_sidecar_config_maps_and_rule_files_one_prometheus_rule(tmp_path: Path):
    chart = tmp_path / "k2ray"
    shutil.copytree(CHART_DIR, chart)  # the dashboards/ and rules/ links are copied as their files
    dashboard = {"title": "k2ray", "panels": []}
    (chart / "dashboards" / "k2ray-overview.json").write_text(json.dumps(dashboard))
    groups = [{"name": "k2ray.up", "rules": [{"alert": "RayDown", "expr": "up == 0", "for": "5m"}]}]
    (chart / "rules" / "availability.yaml").write_text(yaml.safe_dump(groups))
    docs = render(chart_dir=chart)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and "k2ray-overview.json" in d["data"]]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["k2ray-overview.json"]) == dashboard
    assert only(docs, "PrometheusRule")["spec"]["groups"][:1] == groups  # availability.yaml sorts first
