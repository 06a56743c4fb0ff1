"""A billed router app over the FakeEngine with `$web_search` on the embedded local index, the scripts of a
search round and an answer round, and providers that fail or hang."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import BUILTIN_PLANS, DEFAULT_PLAN, UsageCounts
from k2ray.tools import LocalSearchProvider, SearchResponse, WebSearch, WebSearchConfig
from tests.serve.http.billed_app import BilledApp, billed_app

PLAN = BUILTIN_PLANS[DEFAULT_PLAN]
MAX_MODEL_LEN = 4096
QUERY = "first people to land on the Moon"
FACT = "Neil Armstrong"  # in the local index's Apollo 11 document
ANSWER = f"<think>the results say</think>It was {FACT}.<|im_end|>"
USER = [{"role": "user", "content": "Who walked on the Moon first?"}]
OPENAI_TOOLS = [{"type": "builtin_function", "function": {"name": "$web_search"}}]
LEFT_CLIENT_WRITE_S = 0.2
STREAM_TIMEOUT_S = 30.0
SEARCH_TIMEOUT_S = 2.0  # generous (the test machine is shared); a hanging provider outwaits it
SEARCH_CONFIG = {"max_results": 1, "max_result_chars": 300, "max_tool_result_chars": 600,
                 "timeout_s": SEARCH_TIMEOUT_S}


def search_call(name: str = "$web_search", query: str = QUERY, index: int = 0) -> str:
    """The model's output for a search round: a little reasoning, then one call of the search tool."""
    arguments = json.dumps({"query": query})
    return ("<think>I should look this up</think><|tool_calls_section_begin|><|tool_call_begin|>"
            f"functions.{name}:{index}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"
            "<|tool_calls_section_end|><|im_end|>")


def anthropic_tools(max_uses: int | None = None) -> list[dict]:
    tool = {"type": "web_search_20250305", "name": "web_search"}
    return [tool if max_uses is None else {**tool, "max_uses": max_uses}]


class FailingProvider:
    """A provider that raises (a provider bug) or never answers (a time-out)."""

    name = "failing"

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.num_calls = 0
        self.called = asyncio.Event()

    async def search(self, query: str, max_results: int) -> SearchResponse:
        self.num_calls += 1
        self.called.set()
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        raise RuntimeError("the provider broke")

    async def aclose(self) -> None:
        return None


def web_search(provider=None, **config) -> WebSearch:
    return WebSearch(WebSearchConfig(**{**SEARCH_CONFIG, **config}), provider or LocalSearchProvider())


def search_app(tokenizer: K2Tokenizer, tmp_path: Path, provider=None, **config) -> BilledApp:
    return billed_app(tokenizer, tmp_path, script=ANSWER, max_model_len=MAX_MODEL_LEN,
                      web_search=web_search(provider, **config))


def openai_counts(usage: dict) -> UsageCounts:
    return UsageCounts(num_prompt_tokens=usage["prompt_tokens"],
                       num_cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                       num_completion_tokens=usage["completion_tokens"],
                       num_reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"],
                       num_web_searches=usage["server_tool_use"]["web_search_requests"])


def sse_payloads(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def stream_and_leave(app, secret: str, body: dict, leave: asyncio.Event,
                           is_enough: Callable[[list[dict]], bool] = lambda _: False) -> list[dict]:
    """A streaming chat request whose client goes away once `leave` is set (or `is_enough(payloads sent)`)."""
    sent: list[dict] = []
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if request:
            return request.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.extend(sse_payloads(message["body"].decode()))
            if is_enough(sent):
                leave.set()
                await asyncio.sleep(LEFT_CLIENT_WRITE_S)  # the client is gone: this write never completes in time

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "server": ("router", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}
    await asyncio.wait_for(app(scope, receive, send), timeout=STREAM_TIMEOUT_S)
    return sent
