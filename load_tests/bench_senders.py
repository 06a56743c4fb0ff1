"""The paths serve_bench.py drives: the HTTP endpoint, and the two engine baselines it is compared with.

Each sender is `async send(prompt_token_ids, max_tokens) -> RequestResult`, timed from before the request
leaves the load generator to each arrival of new tokens.

- `http_sender`: /v1/completions streamed over SSE (router replica -> engine replica -> engine core).
- `chat_sender`: /v1/chat/completions streamed, with or without tools declared (serve_bench --tools).
- `CoreBaseline` (the headline baseline): the same engine core process the engine replica runs
  (`python -m k2ray.serve.engine.engine_core`, started through `EngineCoreClient`), its deltas coming back over
  the delta channel into a `DeltaReceiver` here, as they come to a router replica. The bench process
  holds only this thin client and the load generator, so against it the HTTP figures measure the HTTP
  path alone: the router, its Serve handle call and the engine replica in front of the core.
- `InProcessBaseline` (the old baseline): `AsyncLLMEngine` in the bench's own process, its step loop
  sharing one GIL with the load generator while the HTTP side's engine has a process of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from k2ray.sampling_params import SamplingParams
from k2ray.serve.channel.delta_receiver import DeltaReceiver
from k2ray.serve.engine.engine_protocol import EngineRequest

JSON_OBJECT = "json_object"
PROMPT_WORDS = ("weather", "flight", "order", "meeting", "city", "please", "book", "check", "today", "the")
# What --tools declares: an enum, a bounded string, a bounded integer, a nested array of objects.
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1,
                                                                               "maximum": 7}}}}},
         {"type": "function", "function": {"name": "create_event", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["title", "attendees"], "properties": {
                 "title": {"type": "string", "maxLength": 24},
                 "attendees": {"type": "array", "maxItems": 4, "items": {
                     "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}}}}]
# The delta channel on one machine: the core reaches the bench's receiver over loopback (as under
# `k2ray serve`).
LOOPBACK = "127.0.0.1"


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def _result(start: float, arrivals: list[float], num_tokens: int) -> RequestResult:
    if not arrivals:
        return RequestResult(False, error="no output")
    return RequestResult(True, ttft_s=arrivals[0] - start, e2e_s=arrivals[-1] - start,
                         num_output_tokens=num_tokens, itl_s=list(np.diff(arrivals)))


def http_sender(client: httpx.AsyncClient, model: str, temperature: float):
    async def send(prompt: list[int], max_tokens: int) -> RequestResult:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        return await _streamed(client, "/v1/completions", body)
    return send


def chat_sender(client: httpx.AsyncClient, model: str, temperature: float, constraint: str | None):
    """/v1/chat/completions streamed, thinking off, constrained by `constraint`: a tool_choice with TOOLS
    declared, "json_object" (a response format: the grammar on every step, the prompt unchanged), or None.
    The token-id prompt becomes words (the same ids, the same text on every path). A declared tool puts
    every decode step under the grammar; `required` also ends the request once its call closes."""
    async def send(prompt: list[int], max_tokens: int) -> RequestResult:
        body = {"model": model, "messages": [{"role": "user", "content": prompt_text(prompt)}],
                "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "thinking": {"type": "disabled"}}
        if constraint == JSON_OBJECT:
            body["response_format"] = {"type": JSON_OBJECT}
        elif constraint is not None:
            body |= {"tools": TOOLS, "tool_choice": constraint}
        return await _streamed(client, "/v1/chat/completions", body)
    return send


def prompt_text(prompt: list[int]) -> str:
    return " ".join(PROMPT_WORDS[token_id % len(PROMPT_WORDS)] for token_id in prompt)


async def _streamed(client: httpx.AsyncClient, path: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    arrivals: list[float] = []
    num_tokens = 0
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(False, error=f"HTTP {resp.status_code}")
            # SSE frames end at a blank line; split bytes ourselves (httpx's aiter_lines also
            # breaks on U+2028, U+0085 ... which random tokens put inside the JSON strings).
            buffer = b""
            async for data in resp.aiter_raw():
                buffer += data
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if not frame.startswith(b"data: {"):
                        continue
                    chunk = json.loads(frame[len(b"data: "):])
                    if "error" in chunk:
                        return RequestResult(False, error=chunk["error"].get("type"))
                    if chunk.get("usage"):
                        num_tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"]:
                        arrivals.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return RequestResult(False, error=type(exc).__name__)
    return _result(start, arrivals, num_tokens)


class CoreBaseline:
    """An engine core process of our own, driven as the engine replica and the router drive theirs."""

    def __init__(self, serve_args, temperature: float) -> None:
        # Imported here: they bring in torch, which the HTTP-only mode (--url) does not need.
        from k2ray.serve.engine.core_replica import core_config
        from k2ray.serve.engine.engine_core_client import EngineCoreClient

        engine = serve_args.engine
        # Same config, thread count and start-up path as the engine replica's core (EngineServer).
        self._core = EngineCoreClient(core_config(serve_args), engine.core_startup_timeout_s)
        self._channel_limits = serve_args.router.channel_limits
        self._receiver: DeltaReceiver | None = None
        self._runs: set[asyncio.Future] = set()  # strong references: the loop keeps only weak ones
        self._temperature = temperature
        self._request_ids = (f"bench-core-{i}" for i in itertools.count())

    async def send(self, prompt: list[int], max_tokens: int) -> RequestResult:
        receiver = await self._started_receiver()
        request_id = next(self._request_ids)
        params = SamplingParams(max_tokens=max_tokens, temperature=self._temperature, ignore_eos=True)
        start = time.perf_counter()
        buffer, reply_to = receiver.open(request_id)
        run = asyncio.ensure_future(self._core.run_on_channel(EngineRequest(request_id, prompt, params,
                                                                            reply_to=reply_to)))
        # Like the router, end the stream at its final delta, not when the core's "finished" comes in.
        self._runs.add(run)
        run.add_done_callback(self._run_done)
        arrivals: list[float] = []
        num_tokens = 0
        is_over = False
        try:
            while (delta := await buffer.take()) is not None:
                is_over = delta.finished
                if delta.failure is not None:
                    return RequestResult(False, error=delta.failure.kind)
                if delta.token_ids:
                    arrivals.append(time.perf_counter())
                    num_tokens += len(delta.token_ids)
                if is_over:
                    break
        finally:
            receiver.discard(request_id)
            if not is_over:  # as EngineServer.submit does when its caller goes away
                run.cancel()
                self._core.forget(request_id)
                if self._core.is_alive:
                    await self._core.abort(request_id)
        return _result(start, arrivals, num_tokens)

    def _run_done(self, run: asyncio.Future) -> None:
        self._runs.discard(run)
        if not run.cancelled():
            run.exception()  # a core that died has failed the request's stream already: nothing to add

    async def close(self) -> None:
        if self._receiver is not None:
            await self._receiver.stop()
        self._core.shutdown()

    async def _started_receiver(self) -> DeltaReceiver:
        if self._receiver is None:  # listens on the event loop that runs the requests
            self._receiver = DeltaReceiver(LOOPBACK, self._channel_limits)
            await self._receiver.start()
        return self._receiver


class InProcessBaseline:
    """AsyncLLMEngine in this process: its step-loop thread shares the GIL with the load generator."""

    def __init__(self, serve_args, temperature: float) -> None:
        import torch

        from k2ray.engine.async_engine import AsyncLLMEngine
        from k2ray.serve.engine.core_replica import engine_config

        torch.set_num_threads(serve_args.engine.torch_threads)  # same budget as the engine replica
        self._engine = AsyncLLMEngine(engine_config(serve_args))
        self._temperature = temperature
        self._request_ids = (f"bench-inprocess-{i}" for i in itertools.count())

    async def send(self, prompt: list[int], max_tokens: int) -> RequestResult:
        params = SamplingParams(max_tokens=max_tokens, temperature=self._temperature, ignore_eos=True)
        start = time.perf_counter()
        arrivals: list[float] = []
        num_tokens = 0
        try:
            async for out in self._engine.add_request(next(self._request_ids), prompt, params):
                if out.outputs[0].token_ids:
                    arrivals.append(time.perf_counter())
                    num_tokens += len(out.outputs[0].token_ids)
        except Exception as exc:
            return RequestResult(False, error=type(exc).__name__)
        return _result(start, arrivals, num_tokens)

    async def close(self) -> None:
        self._engine.shutdown()


# --baselines names -> what serve_bench compares the HTTP path with.
BASELINES = {"core": CoreBaseline, "inprocess": InProcessBaseline}
