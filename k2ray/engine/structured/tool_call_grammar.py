"""StructuredOutputParams -> an xgrammar structural tag over K2 Thinking's output text.

K2's output (k2_facts.md §5) is `[<think>] REASONING </think> CONTENT`, where CONTENT is text (or JSON
under a response format) and may hold one tool-call section:
    <|tool_calls_section_begin|> (<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
    <|tool_call_end|>)+ <|tool_calls_section_end|>
The grammar spells the markers as text: the vocabulary given to xgrammar carries the text of K2's marker
tokens (structured_output.py), so a marker matches as its single special token or as ordinary pieces,
and the output parser, which reads rendered text, sees the same thing either way. Marker text is
excluded from every free span (reasoning, content, JSON strings), so the parser can never find a marker
the grammar did not place. Each call position carries its own running index, and its arguments are
JSON valid against that function's schema (json_schema_grammar.py; a schema keyword it cannot enforce
is refused); the section is the last thing in the output (auto mode
closes the grammar after it).
"""

from __future__ import annotations

from typing import Any

from xgrammar.structural_tag import (
    AnyTextFormat,
    ConstStringFormat,
    Format,
    GrammarFormat,
    OptionalFormat,
    OrFormat,
    SequenceFormat,
    StructuralTag,
    TagFormat,
    TriggeredTagsFormat,
)

from k2ray.api.output_parser import (
    ALL_MARKERS,
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    SECTION_BEGINS,
    SECTION_ENDS,
    THINK_BEGIN,
    THINK_END,
)
from k2ray.api.tool_call_parser import TOOL_ID_PREFIX
from k2ray.engine.structured.json_schema_grammar import json_schema_ebnf
from k2ray.sampling_params import StructuredOutputParams, ToolCallParams, ToolFunction

# The token texts of K2's markers: these (and only these) special tokens get their text in the vocabulary.
MARKER_TOKENS = (THINK_BEGIN, THINK_END, SECTION_BEGINS[0], SECTION_ENDS[0], CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
# Text no free span may contain: every marker the parser recognises, singular variants included.
EXCLUDED_TEXT = list(ALL_MARKERS)
# One whitespace character at most between JSON tokens: a model cannot pad without end.
MAX_JSON_WHITESPACE = 1
ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def build_structural_tag(params: StructuredOutputParams) -> StructuralTag:
    content = _content(params)
    if not params.reasoning:
        return StructuralTag(format=content)
    # The reasoning may leave only through `</think>`: no marker, no stop token inside it.
    reasoning = SequenceFormat(elements=[
        OptionalFormat(content=ConstStringFormat(value=THINK_BEGIN)),
        TagFormat(begin="", content=AnyTextFormat(excludes=EXCLUDED_TEXT), end=THINK_END)])
    return StructuralTag(format=SequenceFormat(elements=[reasoning, content]))


def _content(params: StructuredOutputParams) -> Format:
    schema = params.content_schema
    text: Format = _json(schema) if schema is not None else AnyTextFormat(excludes=EXCLUDED_TEXT)
    tools = params.tool_calls
    if tools is None or not tools.callable_functions:
        return text
    section = _section(tools)
    if tools.mode != "auto":
        return section
    if schema is not None:  # JSON content, or calls instead of it
        return OrFormat(elements=[text, section])
    return TriggeredTagsFormat(
        triggers=[SECTION_BEGINS[0]],
        tags=[TagFormat(begin=SECTION_BEGINS[0], content=_calls(tools, 0), end=SECTION_ENDS[0])],
        excludes=[text for text in EXCLUDED_TEXT if text != SECTION_BEGINS[0]], stop_after_first=True)


def _section(tools: ToolCallParams) -> Format:
    return SequenceFormat(elements=[ConstStringFormat(value=SECTION_BEGINS[0]), _calls(tools, 0),
                                    ConstStringFormat(value=SECTION_ENDS[0])])


def _calls(tools: ToolCallParams, position: int) -> Format:
    """One call at `position`, optionally followed by the calls after it (up to num_call_positions)."""
    call = OrFormat(elements=[_call(f, tools.call_index_start + position) for f in tools.callable_functions])
    if position + 1 >= tools.num_call_positions:
        return call
    return SequenceFormat(elements=[call, OptionalFormat(content=_calls(tools, position + 1))])


def _call(function: ToolFunction, index: int) -> Format:
    head = f"{CALL_BEGIN}{TOOL_ID_PREFIX}{function.name}:{index}{ARGUMENT_BEGIN}"
    return SequenceFormat(elements=[ConstStringFormat(value=head), _json(_arguments_schema(function)),
                                    ConstStringFormat(value=CALL_END)])


def _arguments_schema(function: ToolFunction) -> dict[str, Any]:
    # Arguments are an object whatever the schema leaves open (Anthropic's input must be one).
    schema = function.parameters or ANY_OBJECT_SCHEMA
    return schema if "type" in schema else {**schema, "type": "object"}


def _json(schema: dict[str, Any]) -> GrammarFormat:
    # Our own converter, not xgrammar's JSONSchemaFormat: that one drops minLength/maxLength once
    # excludes are set (xgrammar 0.2.9), so its calls broke length bounds (json_schema_grammar.py).
    return GrammarFormat(grammar=json_schema_ebnf(schema, EXCLUDED_TEXT, MAX_JSON_WHITESPACE))
