"""A real Prometheus (Debian's package) scrapes the live app's Ray metrics export port: the k2ray_ counters
agree with what the clients saw, and every dashboard and rule expression evaluates against it."""

from __future__ import annotations

import httpx
import pytest

from .prometheus_server import INSTALL_HINT, find_prometheus, prometheus_server
from .promql import dashboard_expressions, rule_expressions, rule_groups
from .waits import settled, wait_for, wait_for_any

pytestmark = pytest.mark.skipif(find_prometheus() is None,
                                reason=f"the prometheus binary is not installed ({INSTALL_HINT})")

CHAT = "/v1/chat/completions"
NUM_REQUESTS = 3
MAX_TOKENS = 8
REQUESTS = f'sum(ray_k2ray_requests_total{{route="{CHAT}", status="200"}})'
OUTPUT_TOKENS = "sum(ray_k2ray_output_tokens_total)"
PROMPT_TOKENS = "sum(ray_k2ray_prompt_tokens_total)"


def _metrics_port() -> int:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return int(node["MetricsExportPort"])


@pytest.fixture(scope="module")
def prometheus(live_app):
    binary = find_prometheus()
    with prometheus_server(binary, [f"127.0.0.1:{_metrics_port()}"], rule_groups()) as prom:
        yield prom


def test_counters_agree_with_what_the_clients_saw(live_app, prometheus):
    exprs = (REQUESTS, OUTPUT_TOKENS, PROMPT_TOKENS)
    before = settled(prometheus, exprs)
    usages = []
    with httpx.Client(base_url=live_app.base_url, timeout=120.0) as client:
        for i in range(NUM_REQUESTS):
            body = {"model": live_app.model, "messages": [{"role": "user", "content": f"count {i}"}],
                    "max_tokens": MAX_TOKENS}
            resp = client.post(CHAT, json=body)
            assert resp.status_code == 200, resp.text
            usages.append(resp.json()["usage"])
    wait_for(prometheus, REQUESTS, before[0] + NUM_REQUESTS)
    after = settled(prometheus, exprs)
    assert after[0] - before[0] == NUM_REQUESTS
    assert after[1] - before[1] == sum(u["completion_tokens"] for u in usages)
    assert after[2] - before[2] == sum(u["prompt_tokens"] for u in usages)
    # Over the cumulative buckets: a series born with these observations has no rate() yet.
    ttft_p50 = prometheus.value("histogram_quantile(0.5, sum by (le) (ray_k2ray_ttft_seconds_bucket))")
    assert ttft_p50 is not None and ttft_p50 > 0


def test_every_dashboard_and_rule_expression_evaluates(live_app, prometheus):
    wait_for_any(prometheus, "ray_k2ray_requests_total")
    for where, expr in {**dashboard_expressions(), **rule_expressions()}.items():
        try:
            prometheus.query(expr)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None
    # What the load produced, a recording rule over it, and Ray Serve's series the no-ready-replica alert reads.
    for expr in ("ray_k2ray_requests_total", "ray_k2ray_ttft_seconds_bucket", "ray_k2ray_e2e_seconds_count",
                 "k2ray:requests:rate5m", "ray_serve_deployment_replica_healthy"):
        wait_for_any(prometheus, expr)

