"""End-to-end: the official `openai` SDK against the live Ray Serve app (real engine, tiny random model).

Outputs the random model cannot produce (tool calls, reasoning) come from injected token streams that
still travel the real path: router -> Serve handle -> engine deployment -> parsers -> SSE.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

NO_THINK = {"thinking": {"type": "disabled"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_CALL_SCRIPT = ("<think>The user wants weather.</think><|tool_calls_section_begin|><|tool_call_begin|>"
                    'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
                    "<|tool_calls_section_end|><|im_end|>")


@pytest.fixture
def client(live_app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live_app.base_url}/v1", api_key="unused", max_retries=0)


def _user(text: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_models_list(client, live_app):
    models = await client.models.list()
    assert [m.id for m in models.data] == [live_app.model]


async def test_chat_non_stream(client, live_app):
    resp = await client.chat.completions.create(model=live_app.model, messages=_user(), max_tokens=8,
                                                extra_body=NO_THINK)
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= 8
    assert usage.prompt_tokens_details.cached_tokens == usage.model_extra["cached_tokens"]
    assert usage.completion_tokens_details.reasoning_tokens == 0
    thinking = await client.chat.completions.create(model=live_app.model, messages=_user(), max_tokens=8)
    details = thinking.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens <= thinking.usage.completion_tokens


async def test_chat_stream_usage_only_when_asked(client, live_app):
    kwargs = {"model": live_app.model, "messages": _user(), "max_tokens": 6, "stream": True, "extra_body": NO_THINK}
    plain = [c async for c in await client.chat.completions.create(**kwargs)]
    assert plain and all(c.choices and c.usage is None for c in plain)
    assert plain[-1].choices[0].finish_reason in ("stop", "length")
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream_options={"include_usage": True})]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.choices and c.usage is None for c in chunks[:-1])


async def test_n_choices(client, live_app):
    resp = await client.chat.completions.create(model=live_app.model, messages=_user(), max_tokens=5, n=3,
                                                extra_body={**NO_THINK, "ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 15


async def test_seeded_sampling_is_reproducible(client, live_app):
    async def sample(seed: int) -> str:
        resp = await client.completions.create(model=live_app.model, prompt="Once upon a time", max_tokens=12,
                                               temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return resp.choices[0].text

    first, again, other = await sample(1234), await sample(1234), await sample(4321)
    assert first == again
    assert first != other


async def test_completions_with_logprobs_and_stream(client, live_app):
    resp = await client.completions.create(model=live_app.model, prompt="abc", max_tokens=4, logprobs=2,
                                           extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    # The legacy format keys top_logprobs by text: two byte tokens that both render as U+FFFD share a key.
    assert len(lp.tokens) == 4 and all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert all(max(top.values()) >= lp.token_logprobs[i] for i, top in enumerate(lp.top_logprobs))
    assert resp.object == "text_completion" and resp.usage.completion_tokens == 4
    stream = await client.completions.create(model=live_app.model, prompt="abc", max_tokens=4, stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_chat_logprobs(client, live_app):
    resp = await client.chat.completions.create(model=live_app.model, messages=_user(), max_tokens=3, logprobs=True,
                                                top_logprobs=3, extra_body={**NO_THINK, "ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


async def test_tool_call_round_trip_with_streamed_deltas(client, live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> tool-call parsing and streamed
    deltas of the OpenAI API."""
    messages = _user("What's the weather in Paris?")
    async with client.chat.completions.stream(
            model=live_app.model, messages=messages, tools=TOOLS, max_tokens=256,
            extra_body={"k2ray_test": {"script": TOOL_CALL_SCRIPT}}) as stream:
        fragments = 0
        async for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments += 1
        final = await stream.get_final_completion()
    assert fragments >= 2  # arguments arrived in pieces and the SDK reassembled them
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "The user wants weather."
    call = msg.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0", "get_weather", {"city": "Paris"})

    messages += [{"role": "assistant", "content": msg.content or "", "tool_calls": [call.model_dump()],
                  "reasoning_content": msg.model_extra["reasoning_content"]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'}]
    answer = await client.chat.completions.create(
        model=live_app.model, messages=messages, tools=TOOLS, max_tokens=64,
        extra_body={"k2ray_test": {"script": "<think>It is sunny.</think>Sunny in Paris.<|im_end|>"}})
    assert answer.choices[0].message.content == "Sunny in Paris."
    assert answer.choices[0].finish_reason == "stop"
    # A second call later in the conversation continues the global counter.
    again = await client.chat.completions.create(
        model=live_app.model, messages=messages, tools=TOOLS, max_tokens=256,
        extra_body={"k2ray_test": {"script": TOOL_CALL_SCRIPT}})
    assert again.choices[0].message.tool_calls[0].id == "functions.get_weather:1"


async def test_reasoning_fields_stream(client, live_app):
    """Path: router -> `submit` -> engine replica -> engine core, which replays the `k2ray_test` script as
    engine outputs -> delta channel (the default transport) -> reasoning parsing and usage."""
    script = "<think>Let me think step by step.</think>The answer is 4.<|im_end|>"
    stream = await client.chat.completions.create(
        model=live_app.model, messages=_user("2+2?"), max_tokens=64, stream=True,
        stream_options={"include_usage": True}, extra_body={"k2ray_test": {"script": script}})
    chunks = [c async for c in stream]
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Let me think step by step.", "The answer is 4.")
    details = chunks[-1].usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < chunks[-1].usage.completion_tokens


async def test_prefix_cache_hits_reported(client, live_app):
    system = "You are a meticulous assistant. " * 24  # a few hundred tokens shared by both requests
    before = await live_app.engine_stats()
    first = await client.chat.completions.create(
        model=live_app.model, max_tokens=2, extra_body=NO_THINK,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "first question"}])
    middle = await live_app.engine_stats()
    second = await client.chat.completions.create(
        model=live_app.model, max_tokens=2, extra_body=NO_THINK,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "second question"}])
    after = await live_app.engine_stats()
    assert first.usage.prompt_tokens_details.cached_tokens == middle["prefix_cache_hits"] - before["prefix_cache_hits"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached == after["prefix_cache_hits"] - middle["prefix_cache_hits"]
    assert second.usage.model_extra["cached_tokens"] == cached


async def test_sixteen_concurrent_streams(client, live_app):
    async def one(i: int) -> tuple[int, str | None]:
        stream = await client.chat.completions.create(
            model=live_app.model, messages=_user(f"stream {i}"), max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={**NO_THINK, "ignore_eos": True})
        chunks = [c async for c in stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return chunks[-1].usage.completion_tokens, finish[0] if finish else None

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert results == [(12, "length")] * 16
    stats = await live_app.engine_stats()
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


async def _wait_idle(live_app, polls: int = 200) -> dict[str, int]:
    for _ in range(polls):
        stats = await live_app.engine_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.05)
    return stats


async def test_client_disconnect_aborts_engine_request(client, live_app):
    budget = live_app.max_model_len - 64
    stream = await client.chat.completions.create(
        model=live_app.model, messages=_user("go on forever"), max_tokens=budget, stream=True,
        extra_body={**NO_THINK, "ignore_eos": True})
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    running = await live_app.engine_stats()
    assert running["num_running"] == 1  # still generating its long budget when the client leaves
    await stream.close()
    stats = await _wait_idle(live_app)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


async def test_stop_string_ends_choice_and_aborts_engine(client, live_app):
    kwargs = {"model": live_app.model, "prompt": "The stop test", "max_tokens": 40, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
    full = (await client.completions.create(**kwargs)).choices[0].text
    stop = full[12:15]
    assert len(stop) == 3
    cut = await client.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 40
    stats = await _wait_idle(live_app)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]
