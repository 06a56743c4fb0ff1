"""ChoiceDecoder and stop strings on K2 outputs, cut into engine deltas at every position."""

from __future__ import annotations

import pytest

from k2ray.api.output_parser import ALL_MARKERS, K2OutputParser
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.engine.engine_protocol import EngineDelta
from k2ray.serve.http.generation import ChoiceDecoder, StopStringMatcher

OUTPUT = ("<think>Weigh options.</think>Calling now.<|tool_calls_section_begin|><|tool_call_begin|>"
          'functions.search:0<|tool_call_argument_begin|>{"q": "k2 é"}<|tool_call_end|>'
          "<|tool_calls_section_end|><|im_end|>")


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(tiny_checkpoint_dir())


def _decode_in_two(tokenizer: K2Tokenizer, ids: list[int], cut: int) -> tuple[str, str, str, ChoiceDecoder]:
    decoder = ChoiceDecoder(0, tokenizer, K2OutputParser(tool_call_id_offset=2), [], False, False)
    reasoning = content = args = ""
    for delta in (EngineDelta(ids[:cut]), EngineDelta(ids[cut:], finish_reason="stop")):
        event = decoder.feed(delta)
        reasoning += event.reasoning
        content += event.content
        args += "".join(c.arguments for c in event.tool_calls)
    return reasoning, content, args, decoder


def test_every_cut_gives_the_same_parse_without_marker_leaks(tokenizer):
    ids = tokenizer.encode(OUTPUT)
    for cut in range(len(ids) + 1):
        reasoning, content, args, decoder = _decode_in_two(tokenizer, ids, cut)
        assert (reasoning, content, args) == ("Weigh options.", "Calling now.", '{"q": "k2 é"}'), cut
        assert not any(m in reasoning + content for m in (*ALL_MARKERS, "<|im_end|>"))
        assert [(c.id, c.name) for c in decoder.tool_calls] == [("functions.search:2", "search")]
        assert decoder.num_completion_tokens == len(ids)
        assert decoder.num_reasoning_tokens == len(tokenizer.encode("<think>Weigh options.</think>"))


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("abc XYZ def")
    decoder = ChoiceDecoder(0, tokenizer, None, ["XY"], False, False)
    text = ""
    for token_id in ids:
        event = decoder.feed(EngineDelta([token_id]))
        text += event.content
        if event.finished:
            break
    assert (text, event.finish_reason, event.stop_sequence) == ("abc ", "stop", "XY")


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["STOP"], include_stop=True)
    assert matcher.push("abcST") == ("ab", None)
    assert matcher.push("OPx") == ("cSTOP", "STOP")
    assert StopStringMatcher(["a"], False).push("xyz") == ("xyz", None)
