"""`$web_search` billing at the edges: failed searches are not billed (the model reads the failure), a client
that leaves mid-loop is billed for the rounds and searches done, an engine failure in a later round, and bad
declarations refused in each API's shape."""

from __future__ import annotations

import asyncio

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import RequestStatus, price_counts
from tests.serve.http.billed_app import CKPT, billed_app
from tests.serve.search.web_search_app import (
    ANSWER,
    FACT,
    MAX_MODEL_LEN,
    OPENAI_TOOLS,
    PLAN,
    USER,
    FailingProvider,
    anthropic_tools,
    openai_counts,
    search_app,
    search_call,
    sse_payloads,
    stream_and_leave,
    web_search,
)

LONG_ANSWER = "<think>ok</think>" + "word " * 60 + "<|im_end|>"


def _streamed_text(payloads: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for p in payloads for c in p.get("choices", []))


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _chat(rounds: list[str], **fields) -> dict:
    return {"model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": OPENAI_TOOLS,
            "k2ray_test": {"rounds": rounds}, **fields}


@pytest.mark.parametrize(("behaviour", "kind"), [("raise", "unavailable"), ("hang", "timeout")])
async def test_failed_search_is_not_billed_and_the_model_reads_why(tokenizer, tmp_path, behaviour, kind):
    provider = FailingProvider(behaviour)
    app = search_app(tokenizer, tmp_path, provider, mode="server")
    try:
        _, secret = app.create_key()
        async with app.http(secret) as http:
            resp = (await http.post("/v1/chat/completions", json=_chat([search_call(), ANSWER]))).json()
            msg = (await http.post("/v1/messages", json={
                "model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": anthropic_tools(),
                "k2ray_test": {"rounds": [search_call("web_search"), ANSWER]}})).json()
        assert provider.num_calls == 2
        for request in (app.engine.requests[1], app.engine.requests[3]):
            assert f"Web search failed ({kind})" in tokenizer.decode(request.prompt_token_ids)
        assert resp["usage"]["server_tool_use"] == {"web_search_requests": 0}
        assert resp["choices"][0]["message"]["content"] == f"It was {FACT}."
        record = await app.record(resp["id"])
        assert record.counts == openai_counts(resp["usage"]) and record.costs.web_search_pico_usd == 0
        error = msg["content"][2]
        assert error["content"] == {"type": "web_search_tool_result_error", "error_code": "unavailable"}
        assert msg["usage"]["server_tool_use"] == {"web_search_requests": 0}
        assert (await app.record(msg["id"])).counts.num_web_searches == 0
    finally:
        app.billing.close()


async def test_client_gone_during_the_search_bills_round_one_and_no_search(tokenizer, tmp_path):
    app_provider = FailingProvider("hang")
    app = search_app(tokenizer, tmp_path, app_provider, mode="server", timeout_s=30.0)
    try:
        _, secret = app.create_key()
        payloads = await stream_and_leave(app.app, secret, _chat([search_call(), ANSWER], stream=True),
                                          app_provider.called)
        record = await app.record(payloads[0]["id"])
        assert record.status is RequestStatus.CANCELLED and len(app.engine.requests) == 1
        assert record.counts.num_web_searches == 0
        assert record.counts.num_completion_tokens == len(tokenizer.encode(search_call()))
        assert record.costs == price_counts(PLAN, record.counts)
    finally:
        app.billing.close()


async def test_client_gone_in_round_two_bills_what_was_sent_and_the_search(tokenizer, tmp_path):
    app = billed_app(tokenizer, tmp_path, max_model_len=MAX_MODEL_LEN, token_delay_s=0.01,
                     web_search=web_search(mode="server"))
    try:
        _, secret = app.create_key()
        num_call = len(tokenizer.encode(search_call()))
        payloads = await stream_and_leave(app.app, secret, _chat([search_call(), LONG_ANSWER], stream=True),
                                          asyncio.Event(), lambda sent: "word" in _streamed_text(sent))
        record = await app.record(payloads[0]["id"])
        first, second = app.engine.requests
        assert record.status is RequestStatus.CANCELLED and second.request_id in app.engine.aborted
        assert record.counts.num_web_searches == 1
        assert record.counts.num_prompt_tokens == len(first.prompt_token_ids) + len(second.prompt_token_ids)
        assert num_call < record.counts.num_completion_tokens < num_call + len(tokenizer.encode(LONG_ANSWER))
        assert record.costs == price_counts(PLAN, record.counts)
    finally:
        app.billing.close()


async def test_engine_failure_in_round_two(tokenizer, tmp_path):
    """Not streamed: a 500, nothing delivered, nothing billed. Streamed: billed for what was sent."""
    app = search_app(tokenizer, tmp_path, mode="server")
    try:
        _, secret = app.create_key()
        failing = {"rounds": [search_call(), LONG_ANSWER], "fail_round": 1, "fail_after_tokens": 4}
        async with app.http(secret) as http:
            resp = await http.post("/v1/chat/completions", json={**_chat([]), "k2ray_test": failing})
            streamed = await http.post("/v1/chat/completions", json={**_chat([]), "k2ray_test": failing,
                                                                      "stream": True})
        assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
        request_ids = [r.request_id.removesuffix("-0") for r in app.engine.requests if r.request_id.endswith("-0")]
        failed = [await app.record(request_id) for request_id in request_ids]
        assert len(failed) == 2 and all(r.status is RequestStatus.FAILED for r in failed)
        assert failed[0].counts.num_completion_tokens == 0 and failed[0].costs.total_pico_usd == 0
        payloads = sse_payloads(streamed.text)
        assert "error" in payloads[-1]
        num_call = len(tokenizer.encode(search_call()))
        assert failed[1].counts.num_completion_tokens == num_call + 4 and failed[1].counts.num_web_searches == 1
    finally:
        app.billing.close()


async def test_moonshot_protocol_runs_the_echoed_search_in_the_next_request(tokenizer, tmp_path):
    app = search_app(tokenizer, tmp_path)  # mode moonshot, the default
    try:
        _, secret = app.create_key()
        async with app.http(secret) as http:
            first = (await http.post("/v1/chat/completions", json=_chat([search_call()]))).json()
            message = first["choices"][0]["message"]
            call = message["tool_calls"][0]
            assert first["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "$web_search"
            echoed = [*USER, {"role": "assistant", "content": "", "reasoning_content": message["reasoning_content"],
                              "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"], "name": "$web_search",
                       "content": call["function"]["arguments"]}]
            second = (await http.post("/v1/chat/completions", json=_chat([ANSWER], messages=echoed))).json()
        assert first["usage"]["server_tool_use"] == {"web_search_requests": 0}
        assert second["usage"]["server_tool_use"] == {"web_search_requests": 1}
        prompt = tokenizer.decode(app.engine.requests[1].prompt_token_ids)
        assert FACT in prompt and second["usage"]["prompt_tokens"] == len(app.engine.requests[1].prompt_token_ids)
        assert second["choices"][0]["message"]["content"] == f"It was {FACT}."
        for resp in (first, second):
            record = await app.record(resp["id"])
            assert record.counts == openai_counts(resp["usage"]) and record.costs == price_counts(PLAN, record.counts)
    finally:
        app.billing.close()


async def test_anthropic_echoed_search_renders_as_the_model_read_it(tokenizer, tmp_path):
    app = search_app(tokenizer, tmp_path, mode="server")
    try:
        _, secret = app.create_key()
        body = {"model": "k2-tiny", "messages": USER, "max_tokens": 300, "tools": anthropic_tools(),
                "k2ray_test": {"rounds": [search_call("web_search"), ANSWER]}}
        async with app.http(secret) as http:
            msg = (await http.post("/v1/messages", json=body)).json()
            turn = [*USER, {"role": "assistant", "content": msg["content"]}, {"role": "user", "content": "Thanks!"}]
            again = (await http.post("/v1/messages", json={**body, "messages": turn,
                                                            "k2ray_test": {"script": ANSWER}})).json()
        loop_prompt = tokenizer.decode(app.engine.requests[1].prompt_token_ids)
        echo_prompt = tokenizer.decode(app.engine.requests[2].prompt_token_ids)
        results = loop_prompt[loop_prompt.index("## Return of"):loop_prompt.rindex("<|im_end|>")]
        assert FACT in results and results in echo_prompt
        assert again["usage"]["server_tool_use"] == {"web_search_requests": 0}
    finally:
        app.billing.close()


async def test_bad_declarations_are_400s(tokenizer, tmp_path):
    app = search_app(tokenizer, tmp_path, mode="server")
    (tmp_path / "plain").mkdir()
    plain = billed_app(tokenizer, tmp_path / "plain")
    try:
        _, secret = app.create_key()
        _, plain_secret = plain.create_key()
        async with app.http(secret) as http, plain.http(plain_secret) as plain_http:
            unknown = await http.post("/v1/chat/completions", json=_chat([ANSWER], tools=[
                {"type": "builtin_function", "function": {"name": "$code_runner"}}]))
            many = await http.post("/v1/chat/completions", json=_chat([ANSWER], n=2))
            off = await plain_http.post("/v1/chat/completions", json=_chat([ANSWER]))
            off_anthropic = await plain_http.post("/v1/messages", json={
                "model": "k2-tiny", "messages": USER, "max_tokens": 8, "tools": anthropic_tools()})
            bad_type = await http.post("/v1/messages", json={
                "model": "k2-tiny", "messages": USER, "max_tokens": 8, "tools": [{"type": "bash_2025", "name": "x"}]})
        for resp in (unknown, many, off):
            assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
        for resp in (off_anthropic, bad_type):
            assert resp.status_code == 400 and resp.json()["type"] == "error", resp.text
        assert "not enabled" in off.json()["error"]["message"]
        assert app.engine.requests == [] and plain.engine.requests == []
        assert await app.records() == 0
    finally:
        app.billing.close()
        plain.billing.close()
