"""A rendered prompt as segments: the template's own text vs text that came from the request.

Only special-token strings in the template's own text become control tokens; a request's content,
names, tool calls, tool results and tool declarations are tokenized as plain text, so a message that
contains `<|im_end|><|im_system|>` cannot open a new turn.

A Jinja template is made to report which text is its own by wrapping every literal it outputs (template
data and `{{ 'constant' }}` strings) in two Unicode noncharacters before compiling; whatever lies
outside a wrapped span came from a variable. (A template that filters its own literals, e.g. a
`{% set %}` block piped through `trim`, would see the markers; K2's templates only output them.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes

# Noncharacters are set aside by Unicode for a program's internal use; requests that carry them are refused.
TRUSTED_BEGIN = "\ufdd0"
TRUSTED_END = "\ufdd1"
_MARKERS = (TRUSTED_BEGIN, TRUSTED_END)


@dataclass(frozen=True)
class PromptSegment:
    text: str
    is_trusted: bool  # the template's own text: its special-token strings become control tokens


def trusted(text: str) -> PromptSegment:
    return PromptSegment(text, True)


def untrusted(text: str) -> PromptSegment:
    return PromptSegment(text, False)


def joined_text(segments: Iterable[PromptSegment]) -> str:
    return "".join(s.text for s in segments)


def merge_segments(segments: Iterable[PromptSegment]) -> list[PromptSegment]:
    """Drops empty segments and joins neighbours of the same kind."""
    merged: list[PromptSegment] = []
    for seg in segments:
        if not seg.text:
            continue
        if merged and merged[-1].is_trusted == seg.is_trusted:
            merged[-1] = PromptSegment(merged[-1].text + seg.text, seg.is_trusted)
        else:
            merged.append(seg)
    return merged


def check_no_markers(value: Any, where: str = "messages") -> None:
    """Raises ValueError if a string anywhere in a request value holds a segment marker."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if TRUSTED_BEGIN in item or TRUSTED_END in item:
                raise ValueError(f"{path} contains a Unicode noncharacter (U+FDD0/U+FDD1), which is not allowed")
        elif isinstance(item, Mapping):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
            stack.extend((k, f"{path}.{k}") for k in item if isinstance(k, str))
        elif isinstance(item, Sequence):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(item))


def mark_template_literals(template: nodes.Template) -> nodes.Template:
    """Wraps every literal the template outputs in trusted markers, in place; returns the template."""
    for output in template.find_all(nodes.Output):
        for child in output.nodes:
            if isinstance(child, nodes.TemplateData) and child.data:
                child.data = TRUSTED_BEGIN + child.data + TRUSTED_END
            elif isinstance(child, nodes.Const) and isinstance(child.value, str) and child.value:
                child.value = TRUSTED_BEGIN + child.value + TRUSTED_END
    return template


def split_marked(text: str) -> list[PromptSegment]:
    """Parses the output of a marked template back into segments (markers removed)."""
    segments: list[PromptSegment] = []
    pos = 0
    while pos < len(text):
        begin = text.find(TRUSTED_BEGIN, pos)
        if begin < 0:
            begin = len(text)
        stray = text.find(TRUSTED_END, pos, begin)
        if stray >= 0:
            raise ValueError("unbalanced prompt segment markers in the rendered template")
        segments.append(untrusted(text[pos:begin]))
        if begin == len(text):
            break
        end = text.find(TRUSTED_END, begin + 1)
        inner = text[begin + 1 : end] if end >= 0 else ""
        if end < 0 or any(m in inner for m in _MARKERS):
            raise ValueError("unbalanced prompt segment markers in the rendered template")
        segments.append(trusted(inner))
        pos = end + 1
    return merge_segments(segments)
