"""`helm lint` and values.schema.json, through Helm's own engine."""

from __future__ import annotations

import helm_python
import pytest

from .chart import CHART_DIR, kinds, render

# helm lint's severities: 1 info, 2 warning, 3 error. The only info today is "icon is recommended".
LINT_WARNING = 2
AUTH_OFF = {"auth": {"enabled": False}}


@pytest.mark.parametrize("values", [None, AUTH_OFF, {**AUTH_OFF, "billing": {"enabled": False}}],
                         ids=["default", "auth-off", "billing-off"])
def test_lint_is_clean(values):
    report = helm_python.lint(CHART_DIR, values, strict=True, namespace="llm", kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= LINT_WARNING] == []


def test_default_release_objects():
    assert kinds(render()) == ["ConfigMap", "ConfigMap", "NetworkPolicy", "PodMonitor", "PrometheusRule",
                               "RayService", "Service"]  # a ConfigMap per dashboard


def test_monitoring_and_network_policy_can_be_turned_off():
    values = {"metrics": {"podMonitor": {"enabled": False}, "dashboards": {"enabled": False},
                          "prometheusRule": {"enabled": False}}, "networkPolicy": {"enabled": False}}
    assert kinds(render(values)) == ["RayService", "Service"]


@pytest.mark.parametrize(("values", "message"), [
    ({"colocated": {"replicas": 0}}, "/colocated/replicas"),
    ({"engine": {"max_num_seqs": "lots"}}, "/engine/max_num_seqs"),
    ({"engine": {"num_replicas": 2}}, "num_replicas"),  # comes from the pool, not from engine options
    ({"router": {"engine_transport": "carrier-pigeon"}}, "/router/engine_transport"),
    ({"serve": {"logLevel": "LOUD"}}, "/serve/logLevel"),
    ({"colocated": {"resources": {"requests": {"memory": "lots"}}}}, "/colocated/resources"),
    ({"rayVersion": "latest"}, "/rayVersion"),
    ({"router": {"admin_token": "hunter2"}}, "admin_token"),  # secrets only from Secrets
    ({"search": {"provider": "bing"}}, "/search/provider"),
    ({"models": [{"id": ""}]}, "/models/0/id"),
    ({"typo": 1}, "typo"),
])
def test_values_schema_rejects(values, message):
    chart = helm_python.Chart.load(CHART_DIR)
    with pytest.raises(helm_python.HelmError, match=message):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)
    report = helm_python.lint(CHART_DIR, values, strict=True)
    assert any(message in m["error"] for m in report["messages"] if m["severity"] >= LINT_WARNING)


@pytest.mark.parametrize(("values", "message"), [
    ({"epSize": 3, "colocated": {"replicas": 1, "gpusPerWorker": 8}}, "must be a multiple of epSize"),
    ({"epSize": 16, "disaggregated": True}, "prefill.gpusPerWorker"),
])
def test_values_serve_args_cannot_express_fail_clearly(values, message):
    """A release whose values k2ray cannot run as asked is refused instead of running a config that
    silently ignores them (EP ranks sharing a pod's GPUs unevenly)."""
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"billing": {"enabled": False}}, "auth.enabled needs billing.enabled"),
    ({"search": {"provider": "searxng"}}, "search.provider searxng needs search.searxng.baseUrl"),
])
def test_inconsistent_values_fail_with_the_reason(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)
