"""Tool calls and JSON output through the router app over the real engine (the random k2-tiny model,
in process): OpenAI and Anthropic, stream and non-stream. Every call must name a declared function with
schema-valid arguments, `required`/named must call, `none` never, parallel off at most one call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import jsonschema
import pytest

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.async_engine import AsyncLLMEngine
from k2ray.engine.config import EngineConfig
from k2ray.engine.scheduler import RequestRejected
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import RequestLimits, ServedModel
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, EngineRequest
from k2ray.serve.http.router import build_router_app
from k2ray.serve.http.router_context import Admission, RouterContext

MAX_MODEL_LEN = 1024
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["q"], "properties": {"q": {"type": "boolean"}}}
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
OPENAI_TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS.items()]
ANTHROPIC_TOOLS = [{"name": n, "input_schema": s} for n, s in SCHEMAS.items()]
ANSWER = {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
NUM_CHOICES = 16
MAX_TOKENS = 96
# A small share of max_tokens for the reasoning, so the constrained part has room in few tokens.
LIMITS = RequestLimits(reasoning_token_share=0.15)


class InProcessEngine:
    """The router's EngineClient over an in-process AsyncLLMEngine (the real engine and grammar)."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        try:
            async for out in self.engine.add_request(request.request_id, request.prompt_token_ids,
                                                     request.sampling_params):
                completion = out.outputs[0]
                yield EngineDelta(list(completion.token_ids), num_cached_tokens=out.num_cached_tokens,
                                  finish_reason=completion.finish_reason)
        except RequestRejected as exc:
            yield EngineDelta(failure=EngineFailure("rejected", str(exc)))


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), block_size=4, num_kv_blocks=4096,
                                         max_num_batched_tokens=1024, max_num_seqs=64,
                                         max_model_len=MAX_MODEL_LEN))
    yield engine
    engine.shutdown()


@pytest.fixture
async def http(engine: AsyncLLMEngine) -> AsyncIterator[httpx.AsyncClient]:
    checkpoint = tiny_checkpoint_dir()
    ctx = RouterContext(tokenizer=K2Tokenizer.from_pretrained(checkpoint),
                        template=ChatTemplate.from_checkpoint(checkpoint), engine=InProcessEngine(engine),
                        models=(ServedModel(id="k2-tiny"),), max_model_len=MAX_MODEL_LEN,
                        admission=Admission(64, retry_after_s=1), limits=LIMITS)
    transport = httpx.ASGITransport(app=build_router_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=600) as client:
        yield client


def _chat(**fields) -> dict:
    return {"model": "k2-tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 0, "n": NUM_CHOICES, **fields}


def _valid_calls(calls: list[dict]) -> list[str]:
    names = []
    for call in calls:
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
        names.append(name)
    return names


async def _post(http: httpx.AsyncClient, path: str, body: dict) -> dict:
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(("tool_choice", "parallel"), [
    ("auto", True), ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "search"}}, True), ("none", True)])
async def test_openai_calls_follow_tool_choice(http: httpx.AsyncClient, tool_choice, parallel: bool) -> None:
    body = await _post(http, "/v1/chat/completions",
                       _chat(tools=OPENAI_TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel))
    finished = [c for c in body["choices"] if c["finish_reason"] != "length"]
    assert finished, [c["finish_reason"] for c in body["choices"]]
    for choice in finished:
        message = choice["message"]
        names = _valid_calls(message.get("tool_calls") or [])
        assert choice["finish_reason"] == ("tool_calls" if names else "stop")
        assert "<|" not in (message.get("content") or "") + (message.get("reasoning_content") or "")
        if tool_choice == "none":
            assert not names
        elif tool_choice != "auto":
            assert names, "a forced tool choice must call"
        if isinstance(tool_choice, dict):
            assert names == ["search"]
        if not parallel:
            assert len(names) == 1


async def test_openai_streamed_calls_concatenate_to_valid_arguments(http: httpx.AsyncClient) -> None:
    body = _chat(tools=OPENAI_TOOLS, tool_choice="required", stream=True)
    calls: dict[tuple[int, int], dict] = {}
    finish: dict[int, str] = {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: "):])["choices"]:
                for delta in choice["delta"].get("tool_calls") or []:
                    call = calls.setdefault((choice["index"], delta["index"]),
                                            {"function": {"name": "", "arguments": ""}})
                    call["function"]["name"] += delta.get("function", {}).get("name") or ""
                    call["function"]["arguments"] += delta.get("function", {}).get("arguments") or ""
                if choice.get("finish_reason"):
                    finish[choice["index"]] = choice["finish_reason"]
    called = [i for i, reason in finish.items() if reason == "tool_calls"]
    assert called and all(reason in ("tool_calls", "length") for reason in finish.values())
    _valid_calls([call for (i, _), call in calls.items() if finish[i] == "tool_calls"])


@pytest.mark.parametrize("thinking", [True, False])
async def test_json_schema_content_that_stops_validates(http: httpx.AsyncClient, thinking: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    body = await _post(http, "/v1/chat/completions",
                       _chat(response_format=fmt, thinking={"type": "enabled" if thinking else "disabled"}))
    stopped = [c for c in body["choices"] if c["finish_reason"] == "stop"]
    assert len(stopped) >= NUM_CHOICES // 2, [c["finish_reason"] for c in body["choices"]]
    for choice in stopped:
        jsonschema.validate(json.loads(choice["message"]["content"]), ANSWER)
        assert bool(choice["message"].get("reasoning_content")) == thinking or not thinking


def _messages(**fields) -> dict:
    return {"model": "k2-tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "tools": ANTHROPIC_TOOLS, **fields}


@pytest.mark.parametrize("tool_choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
async def test_anthropic_tool_use_input_is_a_valid_object(http: httpx.AsyncClient, tool_choice: dict) -> None:
    num_tool_use = 0
    for _ in range(NUM_CHOICES // 4):
        body = await _post(http, "/v1/messages", _messages(tool_choice=tool_choice))
        blocks = [b for b in body["content"] if b["type"] == "tool_use"]
        if body["stop_reason"] == "max_tokens":
            continue
        assert body["stop_reason"] == "tool_use" and blocks
        for block in blocks:
            assert isinstance(block["input"], dict)
            jsonschema.validate(block["input"], SCHEMAS[block["name"]])
            assert "name" not in tool_choice or block["name"] == tool_choice["name"]
        num_tool_use += 1
    assert num_tool_use


async def test_anthropic_streamed_input_json_concatenates_to_the_object(http: httpx.AsyncClient) -> None:
    num_tool_use = 0
    for _ in range(NUM_CHOICES // 4):
        body = _messages(tool_choice={"type": "tool", "name": "get_weather"}, stream=True)
        blocks: dict[int, dict] = {}
        stop_reason = None
        async with http.stream("POST", "/v1/messages", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                    assert event["content_block"]["input"] == {}
                    blocks[event["index"]] = {"name": event["content_block"]["name"], "json": ""}
                elif event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
                    blocks[event["index"]]["json"] += event["delta"]["partial_json"]
                elif event["type"] == "message_delta":
                    stop_reason = event["delta"]["stop_reason"]
        if stop_reason == "max_tokens":
            continue
        assert stop_reason == "tool_use" and blocks
        for block in blocks.values():
            assert block["name"] == "get_weather"
            jsonschema.validate(json.loads(block["json"]), WEATHER)
        num_tool_use += 1
    assert num_tool_use
