"""`$web_search` over a SearXNG-shaped HTTP server on 127.0.0.1, in both modes: results reach the model and are
billed once; a time-out or an HTTP error reaches the model as the tool's output and is not billed."""

from __future__ import annotations

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import price_counts
from k2ray.tools import WebSearch, WebSearchConfig
from tests.serve.http.billed_app import CKPT, billed_app
from tests.serve.search.web_search_app import (
    ANSWER,
    MAX_MODEL_LEN,
    OPENAI_TOOLS,
    PLAN,
    USER,
    openai_counts,
    search_call,
)
from tests.tools.searxng_server import searxng_server

TIMEOUT_S = 2.0  # generous: the test machine is shared; the `slow` query outwaits it
TITLE = "The Great Gatsby"  # in every answer of the test server


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def server():
    with searxng_server() as (base_url, state):
        yield base_url, state


def _app(tokenizer, tmp_path, base_url: str, mode: str):
    config = WebSearchConfig(provider="searxng", mode=mode, timeout_s=TIMEOUT_S, searxng={"base_url": base_url},
                             max_tool_result_chars=600)
    search = WebSearch.from_config(config)
    return billed_app(tokenizer, tmp_path, script=ANSWER, max_model_len=MAX_MODEL_LEN, web_search=search), search


@pytest.mark.parametrize(("query", "seen", "num_billed"), [
    ("who wrote gatsby", TITLE, 1), ("slow", "Web search failed (timeout)", 0),
    ("http-503", "Web search failed (http_error)", 0)])
async def test_server_loop_over_searxng(tokenizer, tmp_path, server, query, seen, num_billed):
    app, search = _app(tokenizer, tmp_path, server[0], "server")
    try:
        _, secret = app.create_key()
        async with app.http(secret) as http:
            resp = (await http.post("/v1/chat/completions", json={
                "model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": OPENAI_TOOLS,
                "k2ray_test": {"rounds": [search_call(query=query), ANSWER]}})).json()
        assert seen in tokenizer.decode(app.engine.requests[1].prompt_token_ids)
        assert resp["usage"]["server_tool_use"] == {"web_search_requests": num_billed}
        record = await app.record(resp["id"])
        assert record.counts == openai_counts(resp["usage"]) and record.costs == price_counts(PLAN, record.counts)
    finally:
        app.billing.close()
        await search.aclose()


async def test_moonshot_echo_over_searxng(tokenizer, tmp_path, server):
    app, search = _app(tokenizer, tmp_path, server[0], "moonshot")
    try:
        _, secret = app.create_key()
        call = {"id": "functions.$web_search:0", "type": "function",
                "function": {"name": "$web_search", "arguments": '{"query": "who wrote gatsby"}'}}
        messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": call["function"]["arguments"]}]
        async with app.http(secret) as http:
            resp = (await http.post("/v1/chat/completions", json={
                "model": "k2-tiny", "messages": messages, "max_tokens": 300, "tools": OPENAI_TOOLS})).json()
        assert TITLE in tokenizer.decode(app.engine.requests[0].prompt_token_ids)
        assert resp["usage"]["server_tool_use"] == {"web_search_requests": 1}
        assert (await app.record(resp["id"])).costs.web_search_pico_usd == PLAN.web_search_micro_usd * 10**6
    finally:
        app.billing.close()
        await search.aclose()
