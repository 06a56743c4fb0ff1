"""Errors at the router edge in each API's own shape: unknown routes and methods, clean field paths and
messages, JSON Schema validation of tool parameters and response_format, no native source paths."""

from __future__ import annotations

import pytest

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.engine.engine_protocol import EngineFailure
from k2ray.serve.http.router_context import failure_to_error

from .test_router_app import _app, _http

USER = [{"role": "user", "content": "x"}]
CHAT = {"model": "k2-tiny", "messages": USER, "max_tokens": 4}
MESSAGES = {"model": "k2-tiny", "messages": USER, "max_tokens": 4}
NOT_A_SCHEMA = {"type": "notatype", "properties": 5}


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


def _assert_openai_error(resp, status: int) -> dict:
    assert resp.status_code == status
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["type"] and body["error"]["message"]
    return body["error"]


def _assert_anthropic_error(resp, status: int) -> dict:
    assert resp.status_code == status
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]
    return body["error"]


async def test_unknown_routes_and_methods_answer_in_the_api_shape(tokenizer):
    _, app = _app(tokenizer)
    async with _http(app) as http:
        err = _assert_openai_error(await http.post("/v1/nope", json=CHAT), 404)
        assert err["type"] == "not_found_error" and "/v1/nope" in err["message"]
        err = _assert_openai_error(await http.get("/v1/chat/completions"), 405)
        assert err["type"] == "invalid_request_error"
        resp = await http.get("/v1/messages")
        assert _assert_anthropic_error(resp, 405)["type"] == "invalid_request_error"
        assert resp.headers["allow"] == "POST"
        err = _assert_anthropic_error(await http.post("/v1/messages/nope", json=MESSAGES), 404)
        assert err["type"] == "not_found_error"


@pytest.mark.parametrize(("body", "message", "param"), [
    ({**CHAT, "tools": [], "tool_choice": "required"}, "Invalid request: tool_choice requires tools", None),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]},
     "Invalid request: messages[0].content: Input should be a valid string", "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "Invalid request: messages[0].content[0].text: Field required", "messages[0].content[0].text"),
    ({**CHAT, "tool_choice": {"type": "function"}}, "Invalid request: tool_choice.function: Field required",
     "tool_choice.function"),
    ({**CHAT, "response_format": {"type": "json_schema"}},
     "Invalid request: response_format: response_format of type json_schema needs a json_schema", "response_format"),
])
async def test_validation_messages_name_the_field_as_sent(tokenizer, body, message, param):
    _, app = _app(tokenizer)
    async with _http(app) as http:
        err = _assert_openai_error(await http.post("/v1/chat/completions", json=body), 400)
    assert (err["message"], err["param"]) == (message, param)


async def test_anthropic_validation_paths_skip_union_members(tokenizer):
    _, app = _app(tokenizer)
    content = [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text"}]}]
    async with _http(app) as http:
        resp = await http.post("/v1/messages", json={**MESSAGES, "messages": [{"role": "user", "content": content}]})
    err = _assert_anthropic_error(resp, 400)
    assert err["message"] == "Invalid request: messages[0].content[0].content[0].text: Field required"


async def test_tool_parameters_must_be_a_json_schema(tokenizer):
    engine, app = _app(tokenizer)
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "bad", "parameters": NOT_A_SCHEMA}}]
    async with _http(app) as http:
        err = _assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400)
        assert err["param"] == "tools[1].function.parameters"
        assert "tools[1].function.parameters" in err["message"] and "JSON Schema" in err["message"]
        resp = await http.post("/v1/messages", json={**MESSAGES, "tools": [{"name": "bad", "input_schema": NOT_A_SCHEMA}]})
        err = _assert_anthropic_error(resp, 400)
        assert "tools[0].input_schema" in err["message"] and "JSON Schema" in err["message"]
        resp = await http.post("/v1/messages/count_tokens", json={
            "model": "k2-tiny", "messages": USER, "tools": [{"name": "bad", "input_schema": NOT_A_SCHEMA}]})
        _assert_anthropic_error(resp, 400)
        assert (await http.post("/v1/chat/completions", json={**CHAT, "tools": tools[:1]})).status_code == 200
    assert len(engine.requests) == 1


async def test_response_format_schema_is_checked_at_the_edge(tokenizer):
    engine, app = _app(tokenizer)
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": NOT_A_SCHEMA}}
    async with _http(app) as http:
        resp = await http.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
    err = _assert_openai_error(resp, 400)
    assert err["param"] == "response_format.json_schema.schema" and "JSON Schema" in err["message"]
    assert not engine.requests


def test_engine_rejections_lose_native_source_locations():
    raw = ("invalid JSON schema for response_format: [17:34:01] /project/cpp/json_schema_converter.cc:5088: "
           "Cannot find field 'nope' in #/nope")
    err = failure_to_error(EngineFailure("rejected", raw))
    assert err.status == 400
    assert err.message == "invalid JSON schema for response_format: Cannot find field 'nope' in #/nope"
