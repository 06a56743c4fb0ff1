"""ChoiceEvents -> Anthropic content-block stream events, in Anthropic's order:
content_block_start, content_block_delta*, content_block_stop per block (thinking, text, tool_use; a server-side
search: server_tool_use with its input as one input_json_delta, then web_search_tool_result whole in its start).
`ping` events may appear anywhere in an Anthropic stream; clients skip them."""

from __future__ import annotations

import json
from typing import Any

from k2ray.serve.http.generation import ChoiceEvent
from k2ray.serve.http.sse import sse_event

PING_FRAME = sse_event("ping", {"type": "ping"})


class AnthropicStreamWriter:
    def __init__(self) -> None:
        self._num_blocks = 0
        self._index = 0  # of the open block; meaningful while _kind is set
        self._kind: str | None = None  # "thinking" | "text" | "tool_use"
        self._tool_index: int | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        frames = self._stop()
        self._index = self._num_blocks
        self._num_blocks += 1
        self._kind = kind
        frames.append(sse_event("content_block_start",
                                {"type": "content_block_start", "index": self._index, "content_block": block}))
        return frames

    def _stop(self) -> list[str]:
        if self._kind is None:
            return []
        self._kind = None
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def feed(self, event: ChoiceEvent) -> list[str]:
        frames: list[str] = []
        if event.reasoning:
            if self._kind != "thinking":
                frames += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            frames.append(self._delta({"type": "thinking_delta", "thinking": event.reasoning}))
        if event.content:
            if self._kind != "text":
                frames += self._start("text", {"type": "text", "text": ""})
            frames.append(self._delta({"type": "text_delta", "text": event.content}))
        for call in event.tool_calls:
            if call.id is not None:
                frames += self._start("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                self._tool_index = call.index
            if call.arguments and self._kind == "tool_use" and call.index == self._tool_index:
                frames.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        for search in event.searches:
            use = search.server_tool_use_block()
            frames += self._start("server_tool_use", {**use, "input": {}})
            frames.append(self._delta({"type": "input_json_delta", "partial_json": json.dumps(use["input"])}))
            frames += self._start("web_search_tool_result", search.result_block())
        return frames

    def close(self) -> list[str]:
        return self._stop()
