"""POST /v1/responses over a FakeEngine, driven by the `openai` SDK over ASGI: output items, stream events
(checked against the SDK's own event types), usage, the grammar settings it hands the engine, and errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import RequestStatus, UsageCounts
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.router import build_router_app

from ..fakes import FakeEngine, make_context
from ..http.billed_app import billed_app

CKPT = str(tiny_checkpoint_dir())
NUM_CACHED = 3
TEXT_SCRIPT = "<think>ponder</think>Hi there<|im_end|>"
TOOL_SCRIPT = ("<think>need weather</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
TWO_CALLS = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
             '{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
             '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
TOOLS = [{"type": "function", "name": "get_weather", "description": "weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


def _app(tokenizer: K2Tokenizer, script: str = TEXT_SCRIPT):
    engine = FakeEngine(tokenizer.encode(script), num_cached_tokens=NUM_CACHED)
    return engine, build_router_app(make_context(CKPT, engine))


def _http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def _openai(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://router/v1", api_key="none", http_client=_http(app), max_retries=0)


async def _raw_events(app, body: dict) -> list[dict]:
    async with _http(app) as http:
        resp = await http.post("/v1/responses", json={"model": "k2-tiny", "stream": True, **body})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in resp.text.splitlines() if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert names == [e["type"] for e in events]
    for event in events:
        EVENTS.validate_python(event)  # every event has the official shape
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


async def test_text_with_reasoning_and_usage(tokenizer):
    engine, app = _app(tokenizer)
    async with _http(app) as http:
        raw = (await http.post("/v1/responses", json={"model": "k2-tiny", "input": "hi",
                                                      "instructions": "Be brief."})).json()
    resp = Response.model_validate(raw)
    assert resp.status == "completed" and resp.incomplete_details is None and resp.id.startswith("resp_")
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "ponder" and resp.output_text == "Hi there"
    usage = resp.usage
    assert usage.input_tokens == len(engine.requests[0].prompt_token_ids)
    assert usage.input_tokens_details.cached_tokens == NUM_CACHED
    assert usage.output_tokens == len(engine.default_script)
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert resp.instructions == "Be brief." and not raw["store"]
    assert tokenizer.decode(engine.requests[0].prompt_token_ids).count("Be brief.") == 1


async def test_stream_events_in_official_order(tokenizer):
    _, app = _app(tokenizer)
    events = await _raw_events(app, {"input": "hi"})
    kinds = [e["type"] for e in events]
    item_events = ["response.output_item.added", "response.content_part.added"]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:4] == item_events
    first_text = kinds.index("response.output_text.delta")
    assert kinds[first_text - 5:first_text] == ["response.reasoning_text.done", "response.content_part.done",
                                                "response.output_item.done", *item_events]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas == "Hi there" == final["output"][1]["content"][0]["text"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    assert final["status"] == "completed" and final["usage"]["output_tokens"] > 0


async def test_sdk_stream_helper_and_non_stream_agree(tokenizer):
    _, app = _app(tokenizer, TOOL_SCRIPT)
    client = _openai(app)
    kwargs = {"model": "k2-tiny", "input": "Weather in Paris?", "tools": TOOLS}
    resp = await client.responses.create(**kwargs)
    async with client.responses.stream(**kwargs) as stream:
        kinds = [event.type async for event in stream]
        streamed = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    for final in (resp, streamed):
        assert [item.type for item in final.output] == ["reasoning", "function_call"]
        call = final.output[1]
        assert (call.call_id, call.name, json.loads(call.arguments)) == (
            "functions.get_weather:0", "get_weather", {"city": "Paris"})
        assert call.status == "completed" and call.id.startswith("fc_")
    assert resp.usage.model_dump() == streamed.usage.model_dump()


async def test_tool_choice_and_format_reach_the_grammar(tokenizer):
    engine, app = _app(tokenizer, TOOL_SCRIPT)
    client = _openai(app)
    await client.responses.create(model="k2-tiny", input="hi", tools=TOOLS, parallel_tool_calls=False,
                                  tool_choice={"type": "function", "name": "get_weather"})
    await client.responses.create(model="k2-tiny", input="hi", tools=TOOLS, tool_choice="required")
    await client.responses.create(model="k2-tiny", input="hi", reasoning={"effort": "none"}, text={
        "format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})
    named, required, schema = (r.sampling_params.structured_output for r in engine.requests)
    assert named.tool_calls.mode == "named" and named.tool_calls.forced_name == "get_weather"
    assert not named.tool_calls.is_parallel and named.reasoning
    assert required.tool_calls.mode == "required"
    assert schema.json_schema == SCHEMA and schema.tool_calls is None and not schema.reasoning


async def test_parallel_off_keeps_one_call(tokenizer):
    engine, app = _app(tokenizer, TWO_CALLS)
    client = _openai(app)
    kwargs = {"model": "k2-tiny", "input": "Oslo and Rome?", "tools": TOOLS, "parallel_tool_calls": False}
    resp = await client.responses.create(**kwargs)
    events = await _raw_events(app, {k: v for k, v in kwargs.items() if k != "model"})
    assert [i.arguments for i in resp.output] == ['{"city": "Oslo"}']
    assert [i["arguments"] for i in events[-1]["response"]["output"]] == ['{"city": "Oslo"}']
    assert len([e for e in events if e["type"] == "response.output_item.added"]) == 1
    assert engine.aborted == engine.started  # the rest of the output was cut in the engine


async def test_max_output_tokens_is_incomplete(tokenizer):
    _, app = _app(tokenizer)
    resp = await _openai(app).responses.create(model="k2-tiny", input="hi", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[-1].status == "incomplete" and resp.usage.output_tokens == 3
    events = await _raw_events(app, {"input": "hi", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_function_call_output_round_trip_renders_the_call(tokenizer):
    engine, app = _app(tokenizer)
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "functions.get_weather:0", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "cloudy"}]
    resp = await _openai(app).responses.create(model="k2-tiny", input=items, tools=TOOLS)
    prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert "functions.get_weather:0" in prompt and '{"city": "Paris"}' in prompt and "cloudy" in prompt
    assert resp.output_text == "Hi there"


async def test_engine_failure_mid_stream_is_response_failed(tokenizer):
    engine, app = _app(tokenizer)
    events = await _raw_events(app, {"input": "hi", "k2ray_test": {"fail_after_tokens": 2}})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert "boom" not in json.dumps(events)


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"store": True}, 400, "store", "store=true is not supported"),
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id", "keeps no previous responses"),
    ({"conversation": "conv_1"}, 400, "conversation", "keeps no conversations"),
    ({"model": "gpt-x"}, 404, "model", "does not exist"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, 400, "input",
     "'input_image' are not supported"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input", "at least 1 item"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type", "'function'"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, 400, None, "unknown function 'nope'"),
])
async def test_errors_in_openai_shape(tokenizer, body, status, param, message):
    engine, app = _app(tokenizer)
    async with _http(app) as http:
        resp = await http.post("/v1/responses", json={"model": "k2-tiny", "input": "hi", **body})
    error = resp.json()["error"]
    assert resp.status_code == status and error["param"] == param and message in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error") and not engine.started


async def test_metered_like_chat(tokenizer, tmp_path):
    """The ledger's record of each response is the usage the client received (the chat path's metering)."""
    billed = billed_app(tokenizer, tmp_path, num_cached_tokens=NUM_CACHED)
    try:
        _, secret = billed.create_key()
        async with billed.http(secret) as http:
            resp = (await http.post("/v1/responses", json={"model": "k2-tiny", "input": "hi"})).json()
            streamed = await http.post("/v1/responses", json={"model": "k2-tiny", "input": "hi", "stream": True})
        final = json.loads(streamed.text.splitlines()[-2][6:])["response"]
        for body in (resp, final):
            record = await billed.record(body["id"])
            usage = body["usage"]
            assert record.status is RequestStatus.OK
            assert record.counts == UsageCounts(
                num_prompt_tokens=usage["input_tokens"],
                num_cached_tokens=usage["input_tokens_details"]["cached_tokens"],
                num_completion_tokens=usage["output_tokens"],
                num_reasoning_tokens=usage["output_tokens_details"]["reasoning_tokens"])
        assert record.counts.num_cached_tokens == NUM_CACHED and record.costs.total_pico_usd > 0
    finally:
        billed.billing.close()
