"""`$web_search` on the live app: scripted model output (the test-only injection, replayed by the engine core and
sent over the delta channel) makes the model call the search tool, the router searches the embedded local
index, and the next round's prompt holds the results: its prompt tokens equal the conversation rendered
here with the same search's text. Server mode (OpenAI chat and Anthropic's `web_search_20250305`) on an app
with a SQLite ledger; Moonshot's echo protocol on the shared live app."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.openai_protocol import ChatCompletionRequest
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import BUILTIN_PLANS, DEFAULT_PLAN, Ledger, price_counts
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.handlers.openai_chat import chat_job
from k2ray.serve.http.prompting import render_chat_prompt
from k2ray.tools import WebSearch, WebSearchConfig, format_tool_text

from .conftest import E2E_ENGINE

SEARCH_APP = "k2ray-web-search"
SEARCH_PREFIX = "/web-search"
PLAN = BUILTIN_PLANS[DEFAULT_PLAN]
SEARCH_CONFIG = {"max_results": 1, "max_result_chars": 300, "max_tool_result_chars": 600}
LEDGER_TIMEOUT_S = 30.0
QUERY = "first people to land on the Moon"
ECHO_QUERY = "Tranquility"  # one short document: the results fit the shared app's context with its defaults
FACT = "Neil Armstrong"
REASONING = "I should look this up"
ANSWER = f"<think>the results say</think>It was {FACT}.<|im_end|>"
USER = [{"role": "user", "content": "Who walked on the Moon first?"}]
OPENAI_TOOLS = [{"type": "builtin_function", "function": {"name": "$web_search"}}]


def _call(name: str, query: str = QUERY) -> str:
    return (f"<think>{REASONING}</think><|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:0"
            f"<|tool_call_argument_begin|>{json.dumps({'query': query})}<|tool_call_end|>"
            "<|tool_calls_section_end|><|im_end|>")


@pytest.fixture(scope="module")
def searching(live_app, tmp_path_factory):
    import ray
    from ray import serve

    from k2ray.serve.app import build_app
    from k2ray.serve.args import load_serve_args
    from k2ray.serve.http.limits_actor import limits_actor_name

    ledger = str(tmp_path_factory.mktemp("web-search") / "ledger.db")
    args = load_serve_args({
        "model": str(tiny_checkpoint_dir()), "app_name": SEARCH_APP, "route_prefix": SEARCH_PREFIX,
        "served_model_name": "k2-tiny",
        "engine": {**E2E_ENGINE, "num_cpus": 0.5},
        "router": {"num_cpus": 0.25, "channel_host": "127.0.0.1"},
        "billing": {"ledger": ledger, "flush_interval_s": 0.05},
        "tools": {"web_search": {"mode": "server", **SEARCH_CONFIG}},
        "testing": {"allow_injection": True},
    })
    serve.run(build_app(args), name=SEARCH_APP, route_prefix=SEARCH_PREFIX)
    base = live_app.base_url.rstrip("/") + SEARCH_PREFIX
    assert httpx.get(f"{base}/health").status_code == 200
    yield base, ledger
    serve.delete(SEARCH_APP)
    ray.kill(ray.get_actor(limits_actor_name(SEARCH_APP), namespace="serve"))


@pytest.fixture(scope="module")
def renderer() -> tuple[ChatTemplate, K2Tokenizer]:
    checkpoint = tiny_checkpoint_dir()
    return ChatTemplate.from_checkpoint(checkpoint), K2Tokenizer.from_pretrained(checkpoint)


async def _search_text(query: str, **config) -> str:
    search = WebSearch.from_config(WebSearchConfig(**config))
    try:
        response = await search.search(query)
    finally:
        await search.aclose()
    assert response.is_ok and FACT in format_tool_text(response, search.config)
    return format_tool_text(response, search.config)


def _prompt_lengths(renderer, body: dict, call_id: str, tool_text: str) -> tuple[int, int]:
    """The two rounds' prompt lengths: the request, then it with the search call and its results appended."""
    template, tokenizer = renderer
    job = chat_job(ChatCompletionRequest.model_validate(body))
    call = {"id": call_id, "type": "function",
            "function": {"name": "$web_search", "arguments": json.dumps({"query": QUERY})}}
    followed = [*job.messages, {"role": "assistant", "content": "", "reasoning_content": REASONING,
                                "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "name": "$web_search", "content": tool_text}]
    first = render_chat_prompt(job, template, tokenizer)
    second = render_chat_prompt(type(job)(followed, job.tools, "auto", None, job.thinking), template, tokenizer)
    return len(first.token_ids), len(second.token_ids)


async def _record(ledger_path: str, request_id: str):
    ledger = Ledger.open(ledger_path)
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    try:
        while (record := ledger.get(request_id)) is None:
            assert time.monotonic() < deadline, f"no ledger record for {request_id}"
            await asyncio.sleep(0.1)
        return record
    finally:
        ledger.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_server_loop_searches_the_local_index_and_bills_the_search(searching, renderer, stream):
    base, ledger = searching
    body = {"model": "k2-tiny", "messages": USER, "max_tokens": 200, "tools": OPENAI_TOOLS, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
            "k2ray_test": {"rounds": [_call("$web_search"), ANSWER]}}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    if stream:
        payloads = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        request_id, usage = payloads[0]["id"], payloads[-1]["usage"]
        content = "".join(c["delta"].get("content") or "" for p in payloads for c in p["choices"])
        assert not any("tool_calls" in c["delta"] for p in payloads for c in p["choices"])
    else:
        request_id, usage = resp.json()["id"], resp.json()["usage"]
        content = resp.json()["choices"][0]["message"]["content"]
    assert content == f"It was {FACT}."
    assert usage["server_tool_use"] == {"web_search_requests": 1}
    num_first, num_second = _prompt_lengths(renderer, body, "functions.$web_search:0",
                                            await _search_text(QUERY, **SEARCH_CONFIG))
    assert usage["prompt_tokens"] == num_first + num_second  # round 2 read exactly the local index's results
    record = await _record(ledger, request_id)
    assert record.counts.num_web_searches == 1
    assert record.counts.num_prompt_tokens == usage["prompt_tokens"]
    assert record.counts.num_completion_tokens == usage["completion_tokens"]
    assert record.costs == price_counts(PLAN, record.counts)
    assert record.costs.web_search_pico_usd == PLAN.web_search_micro_usd * 10**6


async def test_anthropic_server_tool_through_the_sdk(searching):
    base, ledger = searching
    claude = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
    msg = await claude.messages.create(
        model="k2-tiny", max_tokens=200, messages=USER,
        tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
        extra_body={"k2ray_test": {"rounds": [_call("web_search"), ANSWER]}})
    assert [b.type for b in msg.content] == ["thinking", "server_tool_use", "web_search_tool_result", "thinking",
                                             "text"]
    assert msg.content[1].input == {"query": QUERY} and msg.content[2].content[0].title == "Apollo 11"
    assert msg.content[-1].text == f"It was {FACT}." and msg.stop_reason == "end_turn"
    assert msg.usage.server_tool_use.web_search_requests == 1
    record = await _record(ledger, msg.id)
    assert record.counts.num_web_searches == 1 and record.counts.num_completion_tokens == msg.usage.output_tokens
    assert record.counts.num_uncached_tokens == msg.usage.input_tokens
    assert record.costs == price_counts(PLAN, record.counts)


async def test_moonshot_protocol_on_the_live_app(live_app, renderer):
    """The call ends the first response; the client echoes its arguments; the next request searches."""
    body = {"model": live_app.model, "messages": USER, "max_tokens": 200, "tools": OPENAI_TOOLS,
            "k2ray_test": {"script": _call("$web_search", ECHO_QUERY)}}
    async with httpx.AsyncClient(base_url=live_app.base_url, timeout=60) as http:
        first = (await http.post("/v1/chat/completions", json=body)).json()
        message = first["choices"][0]["message"]
        call = message["tool_calls"][0]
        assert first["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "$web_search"
        echoed = [*USER, {"role": "assistant", "content": "", "reasoning_content": message["reasoning_content"],
                          "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "name": "$web_search",
                   "content": call["function"]["arguments"]}]
        second = (await http.post("/v1/chat/completions", json={**body, "messages": echoed,
                                                                  "k2ray_test": {"script": ANSWER}})).json()
    assert first["usage"]["server_tool_use"] == {"web_search_requests": 0}
    assert second["usage"]["server_tool_use"] == {"web_search_requests": 1}
    template, tokenizer = renderer
    searched = [*echoed[:2], {**echoed[2], "content": await _search_text(ECHO_QUERY)}]
    job = chat_job(ChatCompletionRequest.model_validate({**body, "messages": searched}))
    assert second["usage"]["prompt_tokens"] == len(render_chat_prompt(job, template, tokenizer).token_ids)
    assert second["choices"][0]["message"]["content"] == f"It was {FACT}."
