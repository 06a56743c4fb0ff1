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
