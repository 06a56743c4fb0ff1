"""Special and reserved tokens never reach content, reasoning or arguments: the parser consumes K2's
markers, the ChoiceDecoder drops every other special token (vLLM's skip_special_tokens)."""

from __future__ import annotations

import pytest

from k2ray.api.output_parser import K2OutputParser
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.engine.engine_protocol import EngineDelta
from k2ray.serve.http.generation import ChoiceDecoder

# Written with specials that are no K2 marker at every place the parser routes text.
OUTPUT = ("<think>Weigh<|media_content|> options.{r}</think>Call{r}ing.<|tool_calls_section_begin|>{r}"
          "<|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>{{\"q\": {r}\"k2\"}}<|media_pad|>"
          "<|tool_call_end|><|tool_calls_section_end|>Done<|im_middle|>.<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


def _decode(tokenizer: K2Tokenizer, text: str, tools_enabled: bool) -> tuple[str, str, str]:
    decoder = ChoiceDecoder(0, tokenizer, K2OutputParser(tools_enabled=tools_enabled), [], False, False)
    reasoning = content = args = ""
    for token_id in tokenizer.encode(text):
        event = decoder.feed(EngineDelta([token_id]))
        reasoning, content = reasoning + event.reasoning, content + event.content
        args += "".join(c.arguments for c in event.tool_calls)
    event = decoder.feed(EngineDelta(finish_reason="stop"))
    return reasoning + event.reasoning, content + event.content, args + "".join(c.arguments for c in event.tool_calls)


def test_reserved_and_media_tokens_are_dropped_everywhere(tokenizer: K2Tokenizer) -> None:
    reserved = next(name for name in tokenizer.special_token_ids if name.startswith("<|reserved_token_"))
    assert len(tokenizer.encode(reserved)) == 1
    reasoning, content, args = _decode(tokenizer, OUTPUT.format(r=reserved), tools_enabled=True)
    assert (reasoning, content, args) == ("Weigh options.", "Calling.Done.", '{"q": "k2"}')


def test_tool_markers_without_tools_never_reach_content(tokenizer: K2Tokenizer) -> None:
    reasoning, content, args = _decode(tokenizer, OUTPUT.format(r=""), tools_enabled=False)
    assert "<|" not in reasoning + content and not args
    assert reasoning == "Weigh options." and content.startswith("Calling.") and content.endswith("Done.")
