"""Router unit tests: the FastAPI app over a FakeEngine, driven by the official SDKs over ASGI (no Ray)."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import httpx2
import openai
import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.router import build_router_app

from ..fakes import FAKE_MAX_MODEL_LEN, FakeEngine, make_context

CKPT = str(tiny_checkpoint_dir())
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_SCRIPT = ("<think>need weather</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _app(tokenizer: K2Tokenizer, script: str = "<think>ponder</think>Hi there<|im_end|>", **kwargs):
    engine = FakeEngine(tokenizer.encode(script), **{k: v for k, v in kwargs.items() if k != "max_inflight"})
    ctx = make_context(CKPT, engine, max_inflight=kwargs.get("max_inflight", 8))
    return engine, build_router_app(ctx)


def _http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def _openai(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://router/v1", api_key="none", http_client=_http(app), max_retries=0)


def _anthropic(app) -> anthropic.AsyncAnthropic:
    # The anthropic SDK ships its own httpx fork (httpx2).
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://router")
    return anthropic.AsyncAnthropic(base_url="http://router", api_key="none", http_client=http, max_retries=0)


async def test_chat_reasoning_content_and_usage(tokenizer):
    engine, app = _app(tokenizer)
    resp = await _openai(app).chat.completions.create(
        model="k2-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64)
    msg = resp.choices[0].message
    assert msg.content == "Hi there"
    assert msg.model_extra["reasoning_content"] == "ponder"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(engine.default_script)
    assert 0 < resp.usage.completion_tokens_details.reasoning_tokens < resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.model_extra["cached_tokens"] == 0


async def test_unfinished_reasoning_counts_every_token_once(tokenizer):
    engine, app = _app(tokenizer, "<think>still thinking when the budget ends")
    resp = await _openai(app).chat.completions.create(
        model="k2-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == resp.usage.completion_tokens_details.reasoning_tokens == 5


async def test_stream_usage_chunk_only_when_asked(tokenizer):
    _, app = _app(tokenizer)
    client = _openai(app)
    messages = [{"role": "user", "content": "hi"}]
    chunks = [c async for c in await client.chat.completions.create(
        model="k2-tiny", messages=messages, max_tokens=64, stream=True)]
    assert all(c.usage is None and c.choices for c in chunks)
    chunks = [c async for c in await client.chat.completions.create(
        model="k2-tiny", messages=messages, max_tokens=64, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks[:-1])
    assert (text, reasoning) == ("Hi there", "ponder")


async def test_streamed_tool_call_reassembled_by_sdk(tokenizer):
    _, app = _app(tokenizer, TOOL_SCRIPT)
    history = [{"role": "user", "content": "a"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
               {"role": "user", "content": "and Paris?"}]
    client = _openai(app)
    async with client.chat.completions.stream(model="k2-tiny", messages=history, tools=TOOLS,
                                              max_tokens=128) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    # The id counts tool calls across the conversation: one earlier call -> index 1.
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:1", "get_weather", {"city": "Paris"})
    assert final.choices[0].finish_reason == "tool_calls"


async def test_stop_string_cuts_output_and_aborts_engine(tokenizer):
    engine, app = _app(tokenizer, "Hello STOP and more text that never shows<|im_end|>")
    resp = await _openai(app).chat.completions.create(
        model="k2-tiny", messages=[{"role": "user", "content": "x"}], max_tokens=64, stop=["STOP"],
        extra_body={"thinking": {"type": "disabled"}})
    assert resp.choices[0].message.content == "Hello "
    assert resp.choices[0].finish_reason == "stop"
    assert engine.aborted == engine.started


async def test_n_fans_out_with_seed_offsets(tokenizer):
    engine, app = _app(tokenizer)
    resp = await _openai(app).chat.completions.create(
        model="k2-tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8, n=3, seed=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert sorted(r.sampling_params.seed for r in engine.requests) == [7, 8, 9]


async def test_partial_mode_and_forced_tool_call(tokenizer):
    engine, app = _app(tokenizer, " world<|im_end|>")
    client = _openai(app)
    resp = await client.chat.completions.create(
        model="k2-tiny", max_tokens=8,
        messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hello", "partial": True}])
    assert resp.choices[0].message.content == " world"  # the prefix is not repeated
    assert tokenizer.decode(engine.requests[-1].prompt_token_ids).endswith("</think>Hello")
    # No prefill: the engine's grammar makes the model open the section itself.
    engine.default_script = tokenizer.encode(
        '<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
        '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    resp = await client.chat.completions.create(
        model="k2-tiny", max_tokens=32, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = resp.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "functions.get_weather:0", "get_weather", '{"city": "Oslo"}')


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "JSON"),
    (json.dumps({"model": "k2-tiny", "messages": [], "max_tokens": 4}).encode(), 400, "messages"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "nope"),
    (json.dumps({"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": FAKE_MAX_MODEL_LEN}).encode(), 400, str(FAKE_MAX_MODEL_LEN)),
])
async def test_openai_error_shapes(tokenizer, body, status, needle):
    _, app = _app(tokenizer)
    async with _http(app) as http:
        resp = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status
    err = resp.json()["error"]
    assert needle in err["message"] and err["type"]


async def test_overload_and_engine_failure(tokenizer):
    engine, app = _app(tokenizer, overloaded=True)
    async with _http(app) as http:
        body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        resp = await http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        engine.overloaded = False
        resp = await http.post("/v1/chat/completions", json={**body, "k2ray_test": {"fail_after_tokens": 2}})
        assert resp.status_code == 500 and "secret" not in resp.text and "Traceback" not in resp.text
        resp = await http.post("/v1/messages", json={"model": "k2-tiny", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "x"}],
                                                     "k2ray_test": {"fail_after_tokens": 0}})
        assert resp.status_code == 500 and resp.json()["type"] == "error"


async def test_admission_bound_returns_429(tokenizer):
    _, app = _app(tokenizer, token_delay_s=0.05, max_inflight=1)
    client = _openai(app)
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    async with _http(app) as http:
        import asyncio

        slow = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**body)
        assert (await slow).status_code == 200


async def test_anthropic_thinking_and_tool_use(tokenizer):
    _, app = _app(tokenizer, TOOL_SCRIPT)
    client = _anthropic(app)
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}]
    msg = await client.messages.create(model="k2-tiny", max_tokens=128, tools=tools,
                                       messages=[{"role": "user", "content": "weather?"}])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[1].input == {"city": "Paris"} and msg.stop_reason == "tool_use"
    async with client.messages.stream(model="k2-tiny", max_tokens=128, tools=tools,
                                      messages=[{"role": "user", "content": "weather?"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == len(tokenizer.encode(TOOL_SCRIPT))


async def test_anthropic_errors(tokenizer):
    _, app = _app(tokenizer)
    client = _anthropic(app)
    with pytest.raises(anthropic.NotFoundError) as exc:
        await client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="k2-tiny", max_tokens=FAKE_MAX_MODEL_LEN,
                                     messages=[{"role": "user", "content": "x"}])


async def test_raw_sse_chunks_match_protocol_models(tokenizer):
    from openai.types.chat import ChatCompletionChunk as SdkChunk

    from k2ray.api.openai_responses import ChatCompletionChunk

    _, app = _app(tokenizer, TOOL_SCRIPT)
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
            "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}
    async with _http(app) as http:
        resp = await http.post("/v1/chat/completions", json=body)
    frames = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    for frame in frames[:-1]:
        payload = json.loads(frame)
        assert "usage" in payload and "choices" in payload
        ChatCompletionChunk.model_validate(payload)
        SdkChunk.model_validate(payload)


async def test_stream_with_n_choices(tokenizer):
    _, app = _app(tokenizer)
    stream = await _openai(app).chat.completions.create(
        model="k2-tiny", messages=[{"role": "user", "content": "x"}], max_tokens=64, n=2, stream=True)
    chunks = [c async for c in stream]
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "stop", 1: "stop"}
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == "Hi there"


async def test_last_chunk_usage_and_done_leave_in_one_write(tokenizer):
    _, app = _app(tokenizer, token_delay_s=0.001)  # one delta per token
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 64,
            "stream": True, "stream_options": {"include_usage": True}}
    requests = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # no disconnect: the response task cancels this wait when done

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "server": ("router", 80),
             "client": ("test", 1)}
    await app(scope, receive, send)
    writes = [m["body"].decode() for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(writes) > 1 and all(w.startswith("data: ") and w.endswith("\n\n") for w in writes)
    assert '"role":"assistant"' in writes[0]
    last = writes[-1].split("\n\n")[:-1]
    assert '"finish_reason":"stop"' in last[-3] and '"usage":{' in last[-2] and last[-1] == "data: [DONE]"
