"""Server-sent events framing for both APIs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

SSE_DONE = "data: [DONE]\n\n"
# Proxies must not buffer a token stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse_data(payload: Any) -> str:
    """An OpenAI-style frame: `data: {json}`."""
    return f"data: {_dumps(payload)}\n\n"


class ChunkFramer:
    """OpenAI stream chunks sharing one head (id, object, created, model): the head is serialized once
    per stream instead of once per chunk; frames are byte-identical to `sse_data({**head, ...})`."""

    def __init__(self, head: dict[str, Any], usage_null: bool) -> None:
        self._prefix = f'data: {_dumps(head)[:-1]},"choices":['
        self._suffix = '],"usage":null}\n\n' if usage_null else "]}\n\n"

    def frame(self, choice: dict[str, Any]) -> str:
        return f"{self._prefix}{_dumps(choice)}{self._suffix}"


def sse_event(event: str, payload: Any) -> str:
    """An Anthropic-style frame: `event: TYPE` then `data: {json}`."""
    return f"event: {event}\ndata: {_dumps(payload)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even when the client is gone before the body
    generator started (Starlette then never runs the generator, so its `finally` cannot clean up)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
