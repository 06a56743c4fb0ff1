"""Streaming parser for Kimi K2 (Thinking) output text: reasoning, content and tool calls.

K2 output grammar (k2_facts.md §4-5):
    [<think>] REASONING </think> CONTENT
    [<|tool_calls_section_begin|>
        (<|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> ARGS <|tool_call_end|>)*
     <|tool_calls_section_end|>] CONTENT

The parser reads detokenized text WITH special tokens rendered, split anywhere (a marker may span deltas).
A trailing piece of a delta that could still grow into a marker is held back until the next delta decides.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from k2ray.api.tool_call_parser import ToolCall, ToolCallAssembler, ToolCallDelta

__all__ = ["K2OutputParser", "OutputDelta", "ToolCall", "ToolCallDelta", "parse_k2_output"]

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGINS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
ALL_MARKERS = (THINK_BEGIN, THINK_END, *SECTION_BEGINS, *SECTION_ENDS, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)


@dataclass(frozen=True)
class OutputDelta:
    """What one `feed`/`finish` call produced."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.reasoning_content or self.content or self.tool_calls)


class _Mode(enum.Enum):
    REASONING = enum.auto()
    CONTENT = enum.auto()
    SECTION = enum.auto()  # inside a tool-call section, between calls: text is dropped
    CALL_ID = enum.auto()  # after <|tool_call_begin|>, collecting the model's call id
    CALL_ARGS = enum.auto()  # after <|tool_call_argument_begin|>, streaming arguments
    FINISHED = enum.auto()


@dataclass(frozen=True)
class _MarkerSet:
    markers: tuple[str, ...]
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, markers: tuple[str, ...]) -> _MarkerSet:
        return cls(markers, re.compile("|".join(re.escape(m) for m in markers)))

    def partial_suffix_len(self, text: str) -> int:
        # Every marker has "<" only at position 0, so a suffix that may still become a marker starts at
        # the last "<" of the text.
        start = text.rfind("<")
        if start < 0:
            return 0
        tail = text[start:]
        return len(tail) if any(m.startswith(tail) for m in self.markers) else 0


class _DeltaBuilder:
    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[ToolCallDelta] = []

    def add_tool_call(self, delta: ToolCallDelta | None) -> None:
        if delta is None:
            return
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == delta.index and last.id is None and delta.id is None:
            # Argument pieces of one call within one feed are sent as one piece.
            self.tool_calls[-1] = ToolCallDelta(delta.index, None, None, last.arguments + delta.arguments)
        else:
            self.tool_calls.append(delta)

    def build(self) -> OutputDelta:
        return OutputDelta("".join(self.reasoning), "".join(self.content), self.tool_calls)


class K2OutputParser:
    """Incremental K2 output parser.

    - thinking=True: output starts in reasoning; a leading `<think>` is optional. Reasoning ends at `</think>`
      or implicitly at a tool-call section begin. thinking=False: output starts as content, but a
      `<think>...</think>` block found in content still goes to reasoning.
    - tools_enabled=True: tool-call sections become `ToolCall`s; text between section begin and the first
      call is dropped; text after the section end is content; a `<|tool_call_begin|>` outside a section
      opens one implicitly. Stray markers (e.g. `</think>` in content) are dropped, so no marker ever
      reaches content or reasoning. Inside arguments only tool-call markers are recognised.
      Calls whose id yields an empty name are dropped.
    - tools_enabled=False: tool-call markup is not interpreted; its markers are dropped (no marker ever
      reaches content or reasoning) and the text between them is content. A section begin still ends
      reasoning (as vLLM's kimi_k2 reasoning parser does).
    - Arguments are streamed verbatim with whitespace trimmed at both ends.

    `is_reasoning` tells whether text fed now lands in reasoning. To count reasoning tokens, feed one
    token's text at a time and count the token when `is_reasoning` was true before or after its feed
    (this counts both `<think>` and `</think>` as reasoning).
    """

    def __init__(self, thinking: bool = True, tools_enabled: bool = True, tool_call_id_offset: int = 0):
        self._tools_enabled = tools_enabled
        self._mode = _Mode.REASONING if thinking else _Mode.CONTENT
        self._pending = ""
        self._calls = ToolCallAssembler(tool_call_id_offset)
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        tool_markers = (*SECTION_BEGINS, *SECTION_ENDS, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
        self._markers_everywhere = _MarkerSet.of(ALL_MARKERS)
        self._markers_in_reasoning = self._markers_everywhere
        # Think tags inside arguments are argument text (a tool may legitimately write them).
        self._markers_in_arguments = _MarkerSet.of(tool_markers)

    @property
    def is_reasoning(self) -> bool:
        return self._mode is _Mode.REASONING

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._calls.calls)

    @property
    def reasoning_text(self) -> str:
        return "".join(self._reasoning_parts)

    @property
    def content_text(self) -> str:
        return "".join(self._content_parts)

    def feed(self, text_delta: str) -> OutputDelta:
        if self._mode is _Mode.FINISHED:
            raise RuntimeError("K2OutputParser.feed() called after finish()")
        self._pending += text_delta
        out = _DeltaBuilder()
        self._process(out, final=False)
        return out.build()

    def finish(self) -> OutputDelta:
        """Flush held-back text (an incomplete marker is plain text) and close an unterminated call."""
        out = _DeltaBuilder()
        if self._mode is _Mode.FINISHED:
            return out.build()
        self._process(out, final=True)
        if self._mode is _Mode.CALL_ID:  # cut inside a call's id: its name may be cut too, so no call
            self._calls.drop_id()
        out.add_tool_call(self._calls.close())
        self._mode = _Mode.FINISHED
        return out.build()

    def _markers(self) -> _MarkerSet:
        if self._mode is _Mode.CALL_ARGS:
            return self._markers_in_arguments
        if self._mode is _Mode.REASONING:
            return self._markers_in_reasoning
        return self._markers_everywhere

    def _process(self, out: _DeltaBuilder, final: bool) -> None:
        while self._pending:
            markers = self._markers()
            match = markers.pattern.search(self._pending)
            if match is None:
                held = 0 if final else markers.partial_suffix_len(self._pending)
                cut = len(self._pending) - held
                self._emit_text(self._pending[:cut], out)
                self._pending = self._pending[cut:]
                return
            self._emit_text(self._pending[: match.start()], out)
            self._pending = self._pending[match.end() :]
            self._on_marker(match.group(), out)

    def _emit_text(self, text: str, out: _DeltaBuilder) -> None:
        if not text:
            return
        if self._mode is _Mode.REASONING:
            self._reasoning_parts.append(text)
            out.reasoning.append(text)
        elif self._mode is _Mode.CONTENT:
            self._content_parts.append(text)
            out.content.append(text)
        elif self._mode is _Mode.CALL_ID:
            self._calls.add_id_text(text)
        elif self._mode is _Mode.CALL_ARGS:
            out.add_tool_call(self._calls.add_arguments(text))

    def _on_marker(self, marker: str, out: _DeltaBuilder) -> None:
        if not self._tools_enabled:
            self._on_marker_tools_disabled(marker, out)
        elif marker == THINK_BEGIN:
            if self._mode is _Mode.CONTENT:
                self._mode = _Mode.REASONING
        elif marker == THINK_END:
            if self._mode is _Mode.REASONING:
                self._mode = _Mode.CONTENT
        elif marker in SECTION_BEGINS:
            if self._mode in (_Mode.REASONING, _Mode.CONTENT):
                self._mode = _Mode.SECTION
        elif marker == CALL_BEGIN:
            out.add_tool_call(self._calls.begin_id())
            self._mode = _Mode.CALL_ID
        elif marker == ARGUMENT_BEGIN:
            if self._mode is _Mode.CALL_ID:
                out.add_tool_call(self._calls.begin_arguments())
                self._mode = _Mode.CALL_ARGS
        elif marker == CALL_END:
            if self._mode in (_Mode.CALL_ID, _Mode.CALL_ARGS):
                out.add_tool_call(self._calls.close())
                self._mode = _Mode.SECTION
        elif self._mode is not _Mode.REASONING:  # a section end; in reasoning it is stray
            out.add_tool_call(self._calls.close())
            self._mode = _Mode.CONTENT

    def _on_marker_tools_disabled(self, marker: str, out: _DeltaBuilder) -> None:
        if marker == THINK_BEGIN:
            if self._mode is _Mode.CONTENT:
                self._mode = _Mode.REASONING
        elif marker == THINK_END:
            if self._mode is _Mode.REASONING:
                self._mode = _Mode.CONTENT
        elif marker in SECTION_BEGINS:  # ends reasoning; the marker itself is dropped
            self._mode = _Mode.CONTENT


def parse_k2_output(
    text: str, thinking: bool = True, tools_enabled: bool = True, tool_call_id_offset: int = 0
) -> K2OutputParser:
    """Parse a complete output; read `.reasoning_text`, `.content_text`, `.tool_calls` off the result."""
    parser = K2OutputParser(thinking, tools_enabled, tool_call_id_offset)
    parser.feed(text)
    parser.finish()
    return parser
