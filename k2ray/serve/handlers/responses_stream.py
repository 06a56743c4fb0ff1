"""ChoiceEvents -> Responses output items, and the stream events OpenAI sends while building them.

One item is open at a time, in the order K2 writes them: a `reasoning` item (its text as a
`reasoning_text` content part), a `message` (one `output_text` part), `function_call`s; each goes
output_item.added -> (content_part.added) -> *.delta ... -> *.done -> (content_part.done) ->
output_item.done. The non-stream response is built by the same writer, its events left unsent, so
both carry the same items.
"""

from __future__ import annotations

from typing import Any

from k2ray.serve.http.generation import ChoiceEvent
from k2ray.serve.http.router_context import new_request_id

_KINDS = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}


class ResponseItemsWriter:
    """Builds `output` (finished items) from choice events; `feed`/`close` return the events to send."""

    def __init__(self, max_calls: int | None) -> None:
        self.output: list[dict[str, Any]] = []
        self._max_calls = max_calls
        self._num_events = 0
        self._item: dict[str, Any] | None = None  # the open item
        self._text = ""  # its text, or its arguments so far
        self._call_index: int | None = None  # the parser's index of the open call

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event, numbered in sending order."""
        payload = {"type": kind, "sequence_number": self._num_events, **fields}
        self._num_events += 1
        return payload

    def feed(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if event.reasoning:
            if self._kind != "reasoning":
                events += self._open({"type": "reasoning", "summary": [], "content": []},
                                     {"type": "reasoning_text", "text": ""})
            events.append(self._delta("response.reasoning_text.delta", event.reasoning))
        if event.content:
            if self._kind != "message":
                events += self._open({"type": "message", "role": "assistant", "content": []},
                                     {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            events.append(self._delta("response.output_text.delta", event.content, logprobs=[]))
        for call in event.tool_calls:
            if self._max_calls is not None and call.index >= self._max_calls:
                continue  # past the call limit: the decoder cuts the output there
            if call.id is not None:
                events += self._open({"type": "function_call", "call_id": call.id, "name": call.name,
                                      "arguments": ""}, None)
                self._call_index = call.index
            if call.arguments and self._kind == "function_call" and call.index == self._call_index:
                events.append(self._delta("response.function_call_arguments.delta", call.arguments))
        return events

    def close(self, is_complete: bool) -> list[dict[str, Any]]:
        """Finish the open item (`incomplete` when the output budget ran out)."""
        return self._close("completed" if is_complete else "incomplete")

    @property
    def _kind(self) -> str | None:
        return None if self._item is None else self._item["type"]

    def _where(self) -> dict[str, Any]:
        if self._item is None:
            raise RuntimeError("no output item is open")
        return {"item_id": self._item["id"], "output_index": len(self.output)}

    def _open(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[dict[str, Any]]:
        events = self._close("completed")
        self._item = {"id": new_request_id(_KINDS[item["type"]]), **item, "status": "in_progress"}
        self._text = ""
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(self._item)))
        if part is not None:
            events.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        return events

    def _delta(self, kind: str, text: str, **extra: Any) -> dict[str, Any]:
        self._text += text
        content = {} if self._kind == "function_call" else {"content_index": 0}
        return self.event(kind, **self._where(), **content, delta=text, **extra)

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self._item
        if item is None:
            return []
        where = self._where()
        events = []
        if item["type"] == "function_call":
            item["arguments"] = self._text
            events.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                     arguments=self._text))
        else:
            if item["type"] == "reasoning":
                part = {"type": "reasoning_text", "text": self._text}
                events.append(self.event("response.reasoning_text.done", **where, content_index=0, text=self._text))
            else:
                part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
                events.append(self.event("response.output_text.done", **where, content_index=0, text=self._text,
                                         logprobs=[]))
            events.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        item["status"] = status
        events.append(self.event("response.output_item.done", **where, item=item))
        self.output.append(item)
        self._item = None
        return events
