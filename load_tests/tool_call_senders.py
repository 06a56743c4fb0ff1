"""One tool-calling request through one API (OpenAI chat, Anthropic Messages, OpenAI Responses), stream or
not, reduced to what tool_call_eval.py scores: the finish reason (in OpenAI's words) and the calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

ANTHROPIC_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
ANTHROPIC_CHOICE = {"auto": "auto", "required": "any", "named": "tool"}


@dataclass(frozen=True)
class Case:
    api: str  # "openai" | "anthropic" | "responses"
    is_stream: bool
    choice: str  # "auto" | "required" | "named"
    is_thinking: bool
    is_parallel: bool
    tools: dict[str, dict[str, Any]]  # name -> parameters schema
    forced_name: str | None
    seed: int


@dataclass
class Outcome:
    finish: str | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments as sent)
    error: str | None = None


def _openai_body(case: Case, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    choice: Any = case.choice
    if case.choice == "named":
        choice = {"type": "function", "function": {"name": case.forced_name}}
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": case.seed, "stream": case.is_stream, "tool_choice": choice,
            "parallel_tool_calls": case.is_parallel, "thinking": {"type": "enabled" if case.is_thinking else "disabled"},
            "tools": [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in case.tools.items()]}


def _anthropic_body(case: Case, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"type": ANTHROPIC_CHOICE[case.choice], "disable_parallel_tool_use": not case.is_parallel}
    if case.choice == "named":
        choice["name"] = case.forced_name
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "stream": case.is_stream, "tool_choice": choice,
            "thinking": {"type": "enabled" if case.is_thinking else "disabled"},
            "tools": [{"name": n, "input_schema": s} for n, s in case.tools.items()]}


def _responses_body(case: Case, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    choice: Any = {"type": "function", "name": case.forced_name} if case.choice == "named" else case.choice
    body = {"model": model, "input": prompt, "max_output_tokens": max_tokens, "temperature": 1.0,
            "seed": case.seed, "stream": case.is_stream, "tool_choice": choice,
            "parallel_tool_calls": case.is_parallel,
            "tools": [{"type": "function", "name": n, "parameters": s} for n, s in case.tools.items()]}
    if not case.is_thinking:
        body["reasoning"] = {"effort": "none"}
    return body


async def _sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    # SSE lines end at \n only: httpx's aiter_lines also splits at U+2028, U+0085, ... which JSON strings hold raw.
    pending = b""
    async for chunk in response.aiter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield json.loads(line[6:])


def _openai_result(body: dict[str, Any]) -> Outcome:
    choice = body["choices"][0]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or []]
    return Outcome(choice["finish_reason"], calls)


async def _openai_stream(events: AsyncIterator[dict[str, Any]]) -> Outcome:
    out, calls = Outcome(), {}
    async for chunk in events:
        for choice in chunk.get("choices", []):
            for delta in choice["delta"].get("tool_calls") or []:
                name, arguments = calls.get(delta["index"], ("", ""))
                calls[delta["index"]] = (delta["function"].get("name") or name,
                                         arguments + (delta["function"].get("arguments") or ""))
            out.finish = choice.get("finish_reason") or out.finish
    out.calls = [calls[i] for i in sorted(calls)]
    return out


def _anthropic_result(body: dict[str, Any]) -> Outcome:
    calls = [(b["name"], json.dumps(b["input"])) for b in body["content"] if b["type"] == "tool_use"]
    return Outcome(ANTHROPIC_FINISH.get(body["stop_reason"]), calls)


async def _anthropic_stream(events: AsyncIterator[dict[str, Any]]) -> Outcome:
    out, calls = Outcome(), []
    async for event in events:
        if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
            calls.append([event["content_block"]["name"], ""])
        elif event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
            calls[-1][1] += event["delta"]["partial_json"]
        elif event["type"] == "message_delta":
            out.finish = ANTHROPIC_FINISH.get(event["delta"]["stop_reason"])
    out.calls = [(name, arguments or "{}") for name, arguments in calls]
    return out


def _responses_result(response: dict[str, Any]) -> Outcome:
    calls = [(i["name"], i["arguments"]) for i in response["output"] if i["type"] == "function_call"]
    finish = "length" if response["status"] == "incomplete" else ("tool_calls" if calls else "stop")
    return Outcome(finish, calls)


async def _responses_stream(events: AsyncIterator[dict[str, Any]]) -> Outcome:
    calls, final = [], None
    async for event in events:
        if event["type"] == "response.output_item.done" and event["item"]["type"] == "function_call":
            calls.append((event["item"]["name"], event["item"]["arguments"]))
        elif event["type"] in ("response.completed", "response.incomplete", "response.failed"):
            final = event["response"]
    if final is None or final["status"] == "failed":
        return Outcome(error="stream ended without a completed response")
    return Outcome(_responses_result(final).finish, calls)  # the calls as streamed, not as summed up


_APIS = {  # api -> (path, body, non-stream result, stream result)
    "openai": ("/v1/chat/completions", _openai_body, _openai_result, _openai_stream),
    "anthropic": ("/v1/messages", _anthropic_body, _anthropic_result, _anthropic_stream),
    "responses": ("/v1/responses", _responses_body, _responses_result, _responses_stream),
}


async def send(http: httpx.AsyncClient, case: Case, model: str, prompt: str, max_tokens: int) -> Outcome:
    path, make_body, result, stream_result = _APIS[case.api]
    body = make_body(case, model, prompt, max_tokens)
    try:
        if not case.is_stream:
            response = await http.post(path, json=body)
            if response.status_code != 200:
                return Outcome(error=f"HTTP {response.status_code}: {response.text[:200]}")
            return result(response.json())
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return Outcome(error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return await stream_result(_sse(response))
    except (httpx.HTTPError, KeyError, IndexError, json.JSONDecodeError) as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}")
