"""Dashboards and rules name only metrics k2ray defines (as Ray's exporter scrapes them), and the rules are
valid for Prometheus itself (`promtool check rules`, skipped where the Debian package is not installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from k2ray.serve.metrics import all_series_names
from k2ray.serve.metrics.catalog import ALL_METRICS, RAY_EXPORT_PREFIX, RAY_SERVE_SERIES

from .promql import dashboard_expressions, metric_names, recorded_names, rule_expressions, rule_groups


def test_the_parser_finds_series_and_skips_functions_labels_and_literals():
    expr = ('histogram_quantile(0.9, sum by (le, pool) (rate(ray_k2ray_ttft_seconds_bucket{model=~"a|b"}[5m])))'
            ' / on (pool) group_left clamp_min(k2ray:kv_usage:ratio, 1e-9) > bool 2 and up offset 5m')
    assert metric_names(expr) == {"ray_k2ray_ttft_seconds_bucket", "k2ray:kv_usage:ratio", "up"}


def test_every_dashboard_and_rule_expression_names_a_defined_metric():
    known = all_series_names() | RAY_SERVE_SERIES | recorded_names()
    expressions = {**dashboard_expressions(), **rule_expressions()}
    assert len(expressions) > 40
    for where, expr in expressions.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: unknown {sorted(names - known)}"


def test_the_catalog_names_are_k2ray_prefixed_and_unique():
    names = [spec.name for spec in ALL_METRICS]
    assert len(names) == len(set(names))
    assert all(name.startswith("k2ray_") for name in names)
    assert all(s.startswith(RAY_EXPORT_PREFIX + "k2ray_") for s in all_series_names())


def test_the_dashboards_show_the_serving_and_billing_signals():
    used = set().union(*(metric_names(e) for e in dashboard_expressions().values()))
    for series in ("ray_k2ray_ttft_seconds_bucket", "ray_k2ray_itl_seconds_bucket", "ray_k2ray_tpot_seconds_bucket",
                   "ray_k2ray_kv_blocks_used", "ray_k2ray_prefix_cache_hits_total",
                   "ray_k2ray_kv_transfer_bytes_total", "ray_k2ray_expert_imbalance",
                   "ray_k2ray_billed_micro_usd_total", "ray_k2ray_searches_total", "ray_k2ray_requests_total"):
        assert series in used, series


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
