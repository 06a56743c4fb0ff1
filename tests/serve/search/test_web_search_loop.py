"""The server-side search loop over the FakeEngine: the model calls the search tool in round 1, the router runs
it against the local index, round 2 reads the results and answers; the usage counts every round's tokens
and each successful search once, and the ledger record equals it, priced exactly."""

from __future__ import annotations

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import RequestStatus, price_counts
from k2ray.serve.engine.engine_protocol import EngineRequest
from tests.serve.http.billed_app import CKPT
from tests.serve.search.web_search_app import (
    ANSWER,
    FACT,
    OPENAI_TOOLS,
    PLAN,
    USER,
    anthropic_tools,
    openai_counts,
    search_app,
    search_call,
    sse_payloads,
)


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


@pytest.fixture
def app(tokenizer, tmp_path):
    app = search_app(tokenizer, tmp_path, mode="server")
    yield app
    app.billing.close()


def _chat(**fields) -> dict:
    return {"model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": OPENAI_TOOLS,
            "k2ray_test": {"rounds": [search_call(), ANSWER]}, **fields}


def _messages(**fields) -> dict:
    return {"model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": anthropic_tools(),
            "k2ray_test": {"rounds": [search_call("web_search"), ANSWER]}, **fields}


def _prompt_text(tokenizer: K2Tokenizer, request: EngineRequest) -> str:
    return tokenizer.decode(request.prompt_token_ids)


def _assert_two_rounds(app, tokenizer: K2Tokenizer) -> None:
    first, second = app.engine.requests
    assert FACT not in _prompt_text(tokenizer, first)
    assert FACT in _prompt_text(tokenizer, second)  # the local index's result reached round 2
    assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids


async def _assert_record(app, request_id: str, usage: dict, status: RequestStatus = RequestStatus.OK):
    record = await app.record(request_id)
    assert record.status is status
    assert record.counts == openai_counts(usage)
    assert record.costs == price_counts(PLAN, record.counts)
    assert record.costs.web_search_pico_usd == record.counts.num_web_searches * PLAN.web_search_micro_usd * 10**6
    return record


async def test_openai_loop_answers_from_the_search_and_bills_it_once(app, tokenizer):
    _, secret = app.create_key()
    async with app.http(secret) as http:
        resp = (await http.post("/v1/chat/completions", json=_chat())).json()
    choice = resp["choices"][0]
    assert choice["message"]["content"] == f"It was {FACT}." and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]  # the search call is the server's
    _assert_two_rounds(app, tokenizer)
    usage = resp["usage"]
    assert usage["server_tool_use"] == {"web_search_requests": 1}
    assert usage["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in app.engine.requests)
    num_answer = len(tokenizer.encode(ANSWER))
    assert usage["completion_tokens"] == len(tokenizer.encode(search_call())) + num_answer
    record = await _assert_record(app, resp["id"], usage)
    assert record.counts.num_web_searches == 1 and record.costs.web_search_pico_usd > 0


async def test_openai_stream_hides_the_search_call_and_reports_usage_once(app, tokenizer):
    _, secret = app.create_key()
    body = _chat(stream=True, stream_options={"include_usage": True})
    async with app.http(secret) as http:
        payloads = sse_payloads((await http.post("/v1/chat/completions", json=body)).text)
    deltas = [c["delta"] for p in payloads for c in p["choices"]]
    finishes = [c["finish_reason"] for p in payloads for c in p["choices"] if c["finish_reason"]]
    assert not any("tool_calls" in d for d in deltas) and finishes == ["stop"]
    assert "".join(d.get("content", "") for d in deltas) == f"It was {FACT}."
    _assert_two_rounds(app, tokenizer)
    usage = payloads[-1]["usage"]
    assert usage["server_tool_use"] == {"web_search_requests": 1}
    await _assert_record(app, payloads[0]["id"], usage)


def _anthropic_counts(usage: dict, record) -> None:
    assert record.counts.num_uncached_tokens == usage["input_tokens"]
    assert record.counts.num_cached_tokens == usage["cache_read_input_tokens"]
    assert record.counts.num_completion_tokens == usage["output_tokens"]
    assert record.counts.num_web_searches == usage["server_tool_use"]["web_search_requests"] == 1
    assert record.costs == price_counts(PLAN, record.counts)


async def test_anthropic_loop_returns_server_tool_blocks_in_order(app, tokenizer):
    _, secret = app.create_key()
    async with app.http(secret, header="x-api-key") as http:
        msg = (await http.post("/v1/messages", json=_messages())).json()
    assert [b["type"] for b in msg["content"]] == ["thinking", "server_tool_use", "web_search_tool_result",
                                                   "thinking", "text"]
    use, result = msg["content"][1:3]
    assert use["name"] == "web_search" and use["input"] == {"query": "first people to land on the Moon"}
    assert result["tool_use_id"] == use["id"] and result["content"][0]["title"] == "Apollo 11"
    assert msg["stop_reason"] == "end_turn" and msg["content"][-1]["text"] == f"It was {FACT}."
    _assert_two_rounds(app, tokenizer)
    _anthropic_counts(msg["usage"], await app.record(msg["id"]))


async def test_anthropic_stream_sends_the_search_as_blocks(app, tokenizer):
    _, secret = app.create_key()
    async with app.http(secret, header="x-api-key") as http:
        payloads = sse_payloads((await http.post("/v1/messages", json=_messages(stream=True))).text)
    starts = [p["content_block"]["type"] for p in payloads if p["type"] == "content_block_start"]
    assert starts == ["thinking", "server_tool_use", "web_search_tool_result", "thinking", "text"]
    assert [p["type"] for p in payloads].count("content_block_stop") == len(starts)
    inputs = [p["delta"]["partial_json"] for p in payloads if p.get("delta", {}).get("type") == "input_json_delta"]
    assert inputs == ['{"query": "first people to land on the Moon"}']
    final = payloads[-2]
    assert final["type"] == "message_delta" and final["delta"]["stop_reason"] == "end_turn"
    _assert_two_rounds(app, tokenizer)
    _anthropic_counts(final["usage"], await app.record(payloads[0]["message"]["id"]))


async def test_search_limit_drops_the_tool_so_the_model_answers(tokenizer, tmp_path):
    """A model that would search forever: max_uses 1 (Anthropic) and max_rounds 2 (OpenAI) bound the searches;
    the round after the last search has no search tool declared."""
    app = search_app(tokenizer, tmp_path, mode="server", max_rounds=2)
    try:
        _, secret = app.create_key()
        async with app.http(secret) as http:
            resp = (await http.post("/v1/chat/completions", json=_chat(k2ray_test={"rounds": [search_call()]}))).json()
            msg = (await http.post("/v1/messages", json=_messages(
                tools=anthropic_tools(max_uses=1), k2ray_test={"rounds": [search_call("web_search")]}))).json()
        assert resp["usage"]["server_tool_use"] == {"web_search_requests": 2}
        assert msg["usage"]["server_tool_use"] == {"web_search_requests": 1}
        openai_rounds, anthropic_rounds = app.engine.requests[:3], app.engine.requests[3:]
        assert len(anthropic_rounds) == 2
        for last in (openai_rounds[-1], anthropic_rounds[-1]):
            assert "tool_declare" not in _prompt_text(tokenizer, last)
        assert all("tool_declare" in _prompt_text(tokenizer, r) for r in (*openai_rounds[:-1], anthropic_rounds[0]))
        assert resp["choices"][0]["finish_reason"] == "stop" and msg["stop_reason"] == "end_turn"
        assert (await app.record(resp["id"])).counts.num_web_searches == 2
        assert (await app.record(msg["id"])).counts.num_web_searches == 1
    finally:
        app.billing.close()


async def test_max_tokens_bounds_all_rounds(app, tokenizer):
    num_call = len(tokenizer.encode(search_call()))
    _, secret = app.create_key()
    async with app.http(secret) as http:
        resp = (await http.post("/v1/chat/completions", json=_chat(max_tokens=num_call + 3))).json()
    assert resp["usage"]["completion_tokens"] == num_call + 3
    assert resp["choices"][0]["finish_reason"] == "length"
    assert app.engine.requests[1].sampling_params.max_tokens == 3
    await _assert_record(app, resp["id"], resp["usage"])


async def test_parallel_calls_beyond_max_uses_are_refused_unbilled(app, tokenizer):
    two_calls = search_call("web_search").replace(
        "<|tool_calls_section_end|>",
        '<|tool_call_begin|>functions.web_search:1<|tool_call_argument_begin|>{"query": "Eiffel Tower"}'
        "<|tool_call_end|><|tool_calls_section_end|>")
    _, secret = app.create_key()
    async with app.http(secret, header="x-api-key") as http:
        msg = (await http.post("/v1/messages", json=_messages(tools=anthropic_tools(max_uses=1),
                                                              k2ray_test={"rounds": [two_calls, ANSWER]}))).json()
    results = [b for b in msg["content"] if b["type"] == "web_search_tool_result"]
    assert results[0]["content"][0]["title"] == "Apollo 11"
    assert results[1]["content"] == {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
    assert "searches are used up" in _prompt_text(tokenizer, app.engine.requests[1])
    assert msg["usage"]["server_tool_use"] == {"web_search_requests": 1}
    assert (await app.record(msg["id"])).counts.num_web_searches == 1


async def test_admission_reserves_the_searches_price(app):
    """A budget that covers the tokens but not the request's possible searches refuses it up front."""
    key, secret = app.create_key(budget_usd="0.005")  # the tokens' reservation is under $0.001; a search is $0.004
    async with app.http(secret) as http:
        searching = await http.post("/v1/chat/completions", json=_chat())  # up to 3 searches: $0.012
        one_search = await http.post("/v1/messages", json=_messages(tools=anthropic_tools(max_uses=1)))
    assert searching.status_code == 402 and searching.json()["error"]["code"] == "insufficient_quota"
    assert one_search.status_code == 200 and one_search.json()["usage"]["server_tool_use"]["web_search_requests"] == 1
    record = await app.record(one_search.json()["id"])
    assert await app.records() == 1  # the refused request left no record
    assert app.billing.ledger.spent_pico_usd(key.key_id) == record.costs.total_pico_usd
