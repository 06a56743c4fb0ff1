"""A 64K-token prompt accepted and answered end to end through the server, by the tiny checkpoint configured for
K2's 262,144-token window (YaRN factor 64 over 4,096 positions) with a KV cache that holds all of it; one token
beyond that window is the router's 400. Opt in: `pytest -m long_context tests/serve/test_e2e_long_context.py`
(a 64K-token CPU prefill takes minutes on two cores)."""

from __future__ import annotations

import random

import httpx
import pytest

from k2ray.model.default_checkpoint import tiny_checkpoint_dir

pytestmark = [pytest.mark.long_context, pytest.mark.timeout(1800)]

LONG_APP = "k2ray-long"
LONG_PREFIX = "/long"
WINDOW = 262_144
BLOCK_SIZE = 16
LONG_ENGINE = {
    "num_cpus": 0.5, "torch_threads": 2, "block_size": BLOCK_SIZE, "max_num_seqs": 4,
    "max_num_batched_tokens": 4096, "max_model_len": WINDOW, "num_kv_blocks": WINDOW // BLOCK_SIZE,
}
NUM_PROMPT_TOKENS = 65_536
NUM_OUTPUT_TOKENS = 8
FIRST_TOKEN_ID, LAST_TOKEN_ID = 300, 700  # ordinary ids of the tiny checkpoint's 768-token vocabulary
REQUEST_TIMEOUT_S = 900.0


@pytest.fixture(scope="module")
def long_app(live_app):
    from ray import serve

    from k2ray.serve.app import build_app
    from k2ray.serve.args import load_serve_args

    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": LONG_APP, "route_prefix": LONG_PREFIX,
        "served_model_name": "k2-tiny", "engine": LONG_ENGINE,
        "router": {"num_cpus": 0.25},
    })
    serve.run(build_app(args), name=LONG_APP, route_prefix=LONG_PREFIX)
    base = live_app.base_url.rstrip("/") + LONG_PREFIX
    assert httpx.get(f"{base}/health").status_code == 200
    yield base
    serve.delete(LONG_APP)


def _prompt(num_tokens: int) -> list[int]:
    rng = random.Random(7)
    return [rng.randint(FIRST_TOKEN_ID, LAST_TOKEN_ID) for _ in range(num_tokens)]


async def test_a_64k_token_prompt_is_answered_and_one_beyond_the_window_is_a_400(long_app) -> None:
    async with httpx.AsyncClient(base_url=long_app, timeout=REQUEST_TIMEOUT_S) as http:
        models = (await http.get("/v1/models")).json()["data"]
        assert models[0]["max_model_len"] == WINDOW  # the engine's report: its KV cache holds the whole window
        resp = await http.post("/v1/completions", json={
            "model": "k2-tiny", "prompt": _prompt(NUM_PROMPT_TOKENS), "max_tokens": NUM_OUTPUT_TOKENS,
            "temperature": 0, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["usage"]["prompt_tokens"] == NUM_PROMPT_TOKENS
        assert body["usage"]["completion_tokens"] == NUM_OUTPUT_TOKENS
        assert body["choices"][0]["finish_reason"] == "length"
        over = await http.post("/v1/completions", json={
            "model": "k2-tiny", "prompt": _prompt(NUM_PROMPT_TOKENS),
            "max_tokens": WINDOW - NUM_PROMPT_TOKENS + 1})
        assert over.status_code == 400
        assert f"maximum context length is {WINDOW} tokens" in over.json()["error"]["message"]
