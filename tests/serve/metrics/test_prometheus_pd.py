"""A real Prometheus scrapes a running disaggregated app (1 prefill + 1 decode replica, billing and $web_search
on) next to the session's colocated `live_app`, under a short load of both: the counters agree with what the
clients saw, every dashboard panel's and recording rule's expression returns data, every alert evaluates,
every metric the dashboards and rules name is in the scrape (but those no load here can produce), and the
main dashboard is drawn to a PNG (under the test's tmp dir and at `load_tests/out/`).

About three minutes on two cores (two loads, each waited on until Ray's 10 s metrics export settles): opt in
with `pytest -m ops tests/serve/metrics`."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from tests.serve.conftest import E2E_ENGINE, deploy_beside

from .dashboard_png import draw_dashboard
from .prometheus_server import INSTALL_HINT, Prometheus, find_prometheus, prometheus_server
from .promql import ROOT, dashboard_expressions, metric_names, recorded_names, rule_expressions, rule_groups
from .waits import settled, wait_for, wait_for_any

pytestmark = [pytest.mark.ops,
              pytest.mark.skipif(find_prometheus() is None,
                                 reason=f"the prometheus binary is not installed ({INSTALL_HINT})")]

APP = "pdmetrics"
MODEL = "k2-pd-metrics"  # its own model id: the colocated app's series stay apart
CHAT = "/v1/chat/completions"
LOCAL_PREFILL_THRESHOLD = 48  # shorter misses prefill on the decode replica, longer ones go to the prefill pool
NUM_KV_BLOCKS = 48  # 768 tokens: the concurrent long answers below do not fit together, so some are preempted
ENGINE = {**E2E_ENGINE, "num_cpus": 0.25, "num_kv_blocks": NUM_KV_BLOCKS, "max_model_len": 512}
LONG_PROMPT = " ".join(f"fact {i}: the sky over city {i} is clear." for i in range(12))
NUM_SHORT, NUM_LONG, NUM_CONCURRENT = 3, 3, 4
MAX_TOKENS, LONG_ANSWER_TOKENS = 8, 200
PNG_NAME = "k2ray-serving-dashboard.png"
PNG_DIR = ROOT / "load_tests" / "out"
# Series the dashboards and rules read that no load in this suite produces.
NOT_PRODUCED = {
    "ray_k2ray_ledger_write_failures_total": "a failed ledger write",
    "ray_k2ray_pd_prefill_retries_total": "a prefill failing over (tests/serve/pd's fault tests)",
}
SEARCH_CALL = ('<think>look it up</think><|tool_calls_section_begin|><|tool_call_begin|>functions.$web_search:0'
               '<|tool_call_argument_begin|>{"query": "first people to land on the Moon"}<|tool_call_end|>'
               "<|tool_calls_section_end|><|im_end|>")
SEARCH_ANSWER = "<think>the results say</think>It was Neil Armstrong.<|im_end|>"
SCRIPT_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 180.0
SCRAPE_WINDOW_S = 900  # longer than the module runs


def _model(expr: str, model: str = MODEL) -> str:
    return expr.replace("MODEL", f'model="{model}"')


REQUESTS_OK = _model('sum(ray_k2ray_requests_total{MODEL, status="200"})')
PROMPT_TOKENS = _model("sum(ray_k2ray_prompt_tokens_total{MODEL})")
CACHED_TOKENS = _model("sum(ray_k2ray_cached_tokens_total{MODEL})")
OUTPUT_TOKENS = _model("sum(ray_k2ray_output_tokens_total{MODEL})")
SEARCHES = _model("sum(ray_k2ray_searches_total{MODEL})")
BILLED_TOKENS = _model('sum(ray_k2ray_billed_units_total{MODEL, meter!="web_search"})')
BILLED_SEARCHES = _model('sum(ray_k2ray_billed_units_total{MODEL, meter="web_search"})')
ENGINE_GENERATED = 'sum(ray_k2ray_engine_generation_tokens_total{pool=~"prefill|decode"})'
RECORDS_WRITTEN = "sum(ray_k2ray_ledger_records_written_total)"
KV_TRANSFER_SECONDS = 'sum(ray_k2ray_kv_transfer_seconds_sum{pool="decode"})'
KV_TRANSFERS = 'sum(ray_k2ray_kv_transfer_seconds_count{pool="decode"})'
TTFT_SECONDS = _model("sum(ray_k2ray_ttft_seconds_sum{MODEL})")
COUNTERS = (REQUESTS_OK, PROMPT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS, SEARCHES, BILLED_TOKENS, BILLED_SEARCHES,
            ENGINE_GENERATED, RECORDS_WRITTEN, KV_TRANSFER_SECONDS, KV_TRANSFERS, TTFT_SECONDS)


@dataclass
class Load:
    """What the clients saw."""

    started_at: float
    tag: str
    usages: list[dict] = field(default_factory=list)  # of every 200 answer
    num_engine_tokens: int = 0  # completion tokens the engines generated (scripted answers are replayed)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def total(self, key: str, detail: str | None = None) -> int:
        return sum(u[f"{key}_details"][detail] if detail else u[key] for u in self.usages)


def _deploy(live_app, ledger: str) -> str:
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": APP, "route_prefix": f"/{APP}",
        "served_model_name": MODEL, "engine": ENGINE,
        "disaggregated": True, "prefill": {"num_replicas": 1}, "decode": {"num_replicas": 1},
        "pd": {"kv_host": "127.0.0.1", "local_prefill_threshold": LOCAL_PREFILL_THRESHOLD},
        "router": {"num_cpus": 0.25, "channel_host": "127.0.0.1"},
        "billing": {"ledger": ledger, "flush_interval_s": 0.05},
        "tools": {"web_search": {"mode": "server", "max_results": 1, "max_result_chars": 300}},
        "testing": {"allow_injection": True},
    })
    base = deploy_beside(live_app, args)
    return base


@pytest.fixture(scope="module")
def pd_base(live_app, tmp_path_factory):
    import ray
    from ray import serve

    from k2ray.serve.http.limits_actor import limits_actor_name

    yield _deploy(live_app, str(tmp_path_factory.mktemp("pd-metrics") / "ledger.db"))
    serve.delete(APP)
    ray.kill(ray.get_actor(limits_actor_name(APP), namespace="serve"))


def _metrics_port() -> int:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return int(node["MetricsExportPort"])


@pytest.fixture(scope="module")
def prometheus(pd_base):
    with prometheus_server(find_prometheus(), [f"127.0.0.1:{_metrics_port()}"], rule_groups()) as prom:
        yield prom


def _chat(client: httpx.Client, content: str, max_tokens: int = MAX_TOKENS, model: str = MODEL,
          **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    return client.post(CHAT, json=body)


def _ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]


def _run_load(base: str, live_base: str, load: Load) -> None:
    """Short and long prompts (a long one twice: a prefix-cache hit), concurrent long answers that cannot all
    fit in the KV cache, a $web_search round trip, and a few requests to the colocated app."""
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as client:
        engine_usages = [_ok(_chat(client, f"count {i}")) for i in range(NUM_SHORT)]
        # Each starts apart (no cached block): each goes to the prefill pool; then the first again, a cache hit.
        long_prompts = [f"[{load.tag} {i}] {LONG_PROMPT} Which city is {i}?" for i in range(NUM_LONG)]
        engine_usages += [_ok(_chat(client, prompt)) for prompt in [*long_prompts, long_prompts[0]]]
        with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
            engine_usages += [_ok(r) for r in pool.map(
                lambda i: _chat(client, f"story {i}", LONG_ANSWER_TOKENS, ignore_eos=True), range(NUM_CONCURRENT))]
        search = _ok(_chat(client, "Who walked on the Moon first?", 200,
                           tools=[{"type": "builtin_function", "function": {"name": "$web_search"}}],
                           k2ray_test={"rounds": [SEARCH_CALL, SEARCH_ANSWER]}))
        assert search["server_tool_use"] == {"web_search_requests": 1}
    load.usages = [*engine_usages, search]
    load.num_engine_tokens = sum(u["completion_tokens"] for u in engine_usages)
    with httpx.Client(base_url=live_base, timeout=CLIENT_TIMEOUT_S) as client:
        for i in range(NUM_SHORT):
            _ok(_chat(client, f"colocated {i}", model="k2-tiny"))


def _run_errors(base: str, live_base: str) -> None:
    """A 404 from the disaggregated app, an injected engine failure (a 500) from the colocated one."""
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as client:
        assert _chat(client, "hi", model="no-such-model").status_code == 404
    with httpx.Client(base_url=live_base, timeout=CLIENT_TIMEOUT_S) as client:
        failed = _chat(client, "hi", 64, model="k2-tiny", k2ray_test={"fail_after_tokens": 3}, ignore_eos=True)
        assert failed.status_code == 500, failed.text


@pytest.fixture(scope="module")
def load(pd_base, live_app, prometheus) -> Load:
    """The load twice: a warm-up that creates every series (a counter's first sample has no rate), then the
    measured run, whose rates the panels show."""
    load = Load(started_at=time.time(), tag="measured")
    _run_errors(pd_base, live_app.base_url)
    _run_load(pd_base, live_app.base_url, Load(started_at=load.started_at, tag="warm-up"))
    for status in ("404", "500"):
        wait_for_any(prometheus, f'ray_k2ray_requests_total{{status="{status}"}}')
    load.before = dict(zip(COUNTERS, settled(prometheus, COUNTERS), strict=True))
    _run_load(pd_base, live_app.base_url, load)
    wait_for(prometheus, REQUESTS_OK, load.before[REQUESTS_OK] + len(load.usages))
    load.after = dict(zip(COUNTERS, settled(prometheus, COUNTERS), strict=True))
    return load


def test_counters_agree_with_what_the_clients_saw(load):
    grew = {expr: load.after[expr] - load.before[expr] for expr in COUNTERS}
    assert grew[REQUESTS_OK] == len(load.usages)
    assert grew[PROMPT_TOKENS] == load.total("prompt_tokens") == grew[BILLED_TOKENS] - load.total("completion_tokens")
    assert grew[CACHED_TOKENS] == load.total("prompt_tokens", "cached_tokens") > 0
    assert grew[OUTPUT_TOKENS] == load.total("completion_tokens")
    assert grew[SEARCHES] == grew[BILLED_SEARCHES] == 1
    assert grew[RECORDS_WRITTEN] == len(load.usages)
    # The prefill pool samples a remote prompt's first token and the decode pool the rest: none counted twice.
    assert grew[ENGINE_GENERATED] == load.num_engine_tokens
    # Each long prompt's KV moved once, and moving it is part of its request's time to first token.
    assert NUM_LONG <= grew[KV_TRANSFERS] <= NUM_LONG + 1  # the repeat is local if decode still caches it
    assert 0 < grew[KV_TRANSFER_SECONDS] < grew[TTFT_SECONDS]


def _scraped_names(prom: Prometheus) -> set[str]:
    """Every series name scraped during the test (a gauge nobody sets leaves Ray's export after two reports)."""
    window = f"{SCRAPE_WINDOW_S}s"
    result = prom.query(f'group by (__name__) (last_over_time({{__name__=~"ray_k2ray_.+|ray_serve_.+"}}[{window}]))')
    return {series["metric"]["__name__"] for series in result["result"]}


def _refresh_ledger_lag(base: str, prom: Prometheus) -> None:
    """The ledger lag gauge is set by ledger writes only: write one, so the billing panels have a live value."""
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as client:
        _ok(_chat(client, "one more"))
    wait_for_any(prom, "ray_k2ray_ledger_lag_seconds")


def test_every_metric_the_dashboards_and_rules_name_is_scraped(load, prometheus):
    used = set().union(*(metric_names(e) for e in {**dashboard_expressions(), **rule_expressions()}.values()))
    missing = used - recorded_names() - _scraped_names(prometheus) - NOT_PRODUCED.keys()
    assert not missing, f"named by dashboards or rules but not in the scrape: {sorted(missing)}"
    # Both pools' and the colocated pool's engine series, each per replica.
    pools = {s["metric"]["pool"] for s in prometheus.query("ray_k2ray_kv_blocks_used")["result"]}
    assert {"prefill", "decode", "colocated"} <= pools
    assert prometheus.value('sum(ray_k2ray_kv_transfer_bytes_total{pool="decode"})') > 0
    assert prometheus.value('sum(ray_k2ray_pd_local_prefills_total{pool="decode"})') >= NUM_SHORT
    assert prometheus.value('sum(ray_k2ray_preemptions_total{pool="decode"})') > 0
    assert prometheus.value('sum(ray_k2ray_prefix_cache_hits_total{pool=~"prefill|decode"})') > 0


def test_every_panel_and_recording_rule_returns_data_and_every_alert_evaluates(load, pd_base, prometheus):
    _refresh_ledger_lag(pd_base, prometheus)
    scraped = _scraped_names(prometheus) | recorded_names()
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    for where, expr in {**dashboard_expressions(), **rule_expressions()}.items():
        names = metric_names(expr)
        try:
            if where in alerts or not names <= scraped:
                # An alert has data only while it fires; a series no load produced has none.
                prometheus.query(expr)
                assert where in alerts or names & NOT_PRODUCED.keys(), f"{names - scraped} not scraped"
            else:
                wait_for_any(prometheus, expr)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None


def test_the_main_dashboard_is_drawn_from_the_scraped_data(load, prometheus, tmp_path):
    paths = [tmp_path / PNG_NAME, PNG_DIR / PNG_NAME]
    drawn = draw_dashboard(prometheus, load.started_at, time.time(), paths)
    empty = {title for title, num_points in drawn.items() if not num_points}
    assert not empty, empty  # the expert panels too: every MoE replica relays its routing (one rank each here)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

