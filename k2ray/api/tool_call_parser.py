"""Assembles K2 tool calls from the pieces the output parser cuts out of a tool-call section.

A call is `<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>`; the marker
scanning lives in output_parser.py, this module turns id text and argument text into streamed deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOOL_ID_PREFIX = "functions."


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a tool call. The first piece of a call carries `id` and `name` and no
    arguments; later pieces carry only `arguments` text (id and name None)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; `id` is re-minted as `functions.{name}:{tool_call_id_offset + index}`."""

    id: str
    name: str
    arguments: str


def tool_name_from_id(raw_id: str) -> str:
    """Function name from a model tool-call id: `functions.NAME:IDX`, `NAME:IDX` or bare `NAME`
    (names may contain dots; the index follows the last colon)."""
    raw_id = raw_id.strip()
    name = raw_id.rpartition(":")[0] if ":" in raw_id else raw_id
    return name.strip().removeprefix(TOOL_ID_PREFIX)


@dataclass
class _OpenCall:
    index: int
    id: str
    name: str
    argument_parts: list[str] = field(default_factory=list)
    held_whitespace: str = ""  # trailing whitespace, emitted only if more argument text follows


class ToolCallAssembler:
    """Per-output tool-call state. Ids are re-minted with a conversation-global index
    (`tool_call_id_offset` = tool calls in earlier messages), as K2's template and vLLM/SGLang expect.
    A call whose id yields an empty name is dropped, arguments and all."""

    def __init__(self, tool_call_id_offset: int = 0):
        self._tool_call_id_offset = tool_call_id_offset
        self._id_parts: list[str] | None = None  # not None while the call id is being read
        self._open: _OpenCall | None = None
        self._num_started = 0
        self.calls: list[ToolCall] = []

    def begin_id(self) -> ToolCallDelta | None:
        """A `<|tool_call_begin|>`: closes any call still open, then starts reading an id."""
        header = self.close()
        self._id_parts = []
        return header

    def drop_id(self) -> None:
        """Forget an id still being read (the output ended inside it)."""
        self._id_parts = None

    def add_id_text(self, text: str) -> None:
        if self._id_parts is not None:
            self._id_parts.append(text)

    def begin_arguments(self) -> ToolCallDelta | None:
        """A `<|tool_call_argument_begin|>`: the id is complete; returns the call's header delta."""
        if self._id_parts is None:
            return None
        name = tool_name_from_id("".join(self._id_parts))
        self._id_parts = None
        if not name:
            return None
        index = self._num_started
        self._num_started += 1
        call_id = f"{TOOL_ID_PREFIX}{name}:{self._tool_call_id_offset + index}"
        self._open = _OpenCall(index, call_id, name)
        return ToolCallDelta(index, call_id, name, "")

    def add_arguments(self, text: str) -> ToolCallDelta | None:
        """Argument text, trimmed at both ends of the whole argument string."""
        call = self._open
        if call is None:
            return None
        if not call.argument_parts:
            text = text.lstrip()
        text = call.held_whitespace + text
        kept = text.rstrip()
        call.held_whitespace = text[len(kept) :]
        if not kept:
            return None
        call.argument_parts.append(kept)
        return ToolCallDelta(call.index, None, None, kept)

    def close(self) -> ToolCallDelta | None:
        """Ends the current call (at its end marker, a section end, or the end of output). A call that
        never reached its argument marker is emitted with empty arguments; its header is returned."""
        header = self.begin_arguments()
        call = self._open
        if call is not None:
            self.calls.append(ToolCall(call.id, call.name, "".join(call.argument_parts)))
            self._open = None
        return header
