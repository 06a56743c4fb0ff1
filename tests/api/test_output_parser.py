from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field

import pytest

from k2ray.api.output_parser import K2OutputParser, OutputDelta, ToolCall, parse_k2_output
from k2ray.api.tool_call_parser import tool_name_from_id

SEC_B = "<|tool_calls_section_begin|>"
SEC_E = "<|tool_calls_section_end|>"
CALL_B = "<|tool_call_begin|>"
ARG_B = "<|tool_call_argument_begin|>"
CALL_E = "<|tool_call_end|>"
MARKERS = (
    "<think>", "</think>", SEC_B, SEC_E, "<|tool_call_section_begin|>", "<|tool_call_section_end|>",
    CALL_B, ARG_B, CALL_E,
)  # fmt: skip
NUM_RANDOM_SPLITS = 25
MAX_RANDOM_CUTS = 12
SEED = 1234


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    reasoning: str
    content: str
    calls: tuple[tuple[str, str, str], ...] = ()  # (id, name, arguments)
    thinking: bool = True
    tools_enabled: bool = True
    offset: int = 0
    args_are_json: bool = True
    markers_in_output: bool = False  # tools disabled or a flushed dangling partial marker


MULTILINE_ARGS = '{\n  "path": "/tmp/a.py",\n  "code": "if a < b:\\n    print(\'<|x|>\')"\n}'
CASES = [
    Case("reasoning_only", "<think>Let me think about 2+2.\nIt is 4, since 2 < 3.", "Let me think about 2+2.\nIt is 4, since 2 < 3.", ""),
    Case("reasoning_and_content", "<think>The user greets me.</think>\n\nHello! How can I help?", "The user greets me.", "\n\nHello! How can I help?"),
    Case(
        "tool_after_think",
        f'<think>Need the weather.</think>Let me check.{SEC_B}{CALL_B}functions.get_weather:0{ARG_B}{{"city": "Beijing"}}{CALL_E}{SEC_E}',
        "Need the weather.", "Let me check.", (("functions.get_weather:0", "get_weather", '{"city": "Beijing"}'),),
    ),
    Case(
        "tool_without_think_end",
        f'<think>Need the weather.{SEC_B}{CALL_B}functions.get_weather:0{ARG_B}{{"city": "Paris"}}{CALL_E}{SEC_E}',
        "Need the weather.", "", (("functions.get_weather:7", "get_weather", '{"city": "Paris"}'),), offset=7,
    ),
    Case(
        "two_parallel_calls",
        f'<think>Two lookups.</think>{SEC_B} junk {CALL_B} functions.search:3 {ARG_B} {{"q": "a"}} {CALL_E}\n'
        f'{CALL_B}functions.fetch:4{ARG_B}{{"url": "http://x/<y>"}}{CALL_E}{SEC_E}',
        "Two lookups.", "",
        (("functions.search:3", "search", '{"q": "a"}'), ("functions.fetch:4", "fetch", '{"url": "http://x/<y>"}')),
        offset=3,
    ),
    Case(
        "multiline_json_args",
        f"<think>Write the file.</think>{SEC_B}{CALL_B}functions.write_file:0{ARG_B}\n{MULTILINE_ARGS}\n\n{CALL_E}{SEC_E}",
        "Write the file.", "", (("functions.write_file:0", "write_file", MULTILINE_ARGS),),
    ),
    Case(
        "id_without_functions_prefix",
        f'<think>x</think>{SEC_B}{CALL_B}search:0{ARG_B}{{"q": "k2"}}{CALL_E}{SEC_E}',
        "x", "", (("functions.search:2", "search", '{"q": "k2"}'),), offset=2,
    ),
    Case(
        "name_with_dots_singular_markers",
        f'<think>mcp</think><|tool_call_section_begin|>{CALL_B}functions.mcp.server.search:5{ARG_B}{{}}{CALL_E}'
        "<|tool_call_section_end|>",
        "mcp", "", (("functions.mcp.server.search:0", "mcp.server.search", "{}"),),
    ),
    Case(
        "text_after_section",
        f'<think>r</think>Before {SEC_B}{CALL_B}functions.f:0{ARG_B}{{"a": [1, 2]}}{CALL_E}{SEC_E} and after <3',
        "r", "Before  and after <3", (("functions.f:0", "f", '{"a": [1, 2]}'),),
    ),
    Case("no_think_thinking_off", "Plain answer: a < b and <|fake|> stays, <thin is text.", "", "Plain answer: a < b and <|fake|> stays, <thin is text.", thinking=False),
    Case("stray_think_block_thinking_off", "<think>hidden</think>Visible </think>text", "hidden", "Visible text", thinking=False),
    Case(
        "unterminated_call",
        f'<think>go</think>{SEC_B}{CALL_B}functions.get_weather:0{ARG_B}{{"city": "Bei',
        "go", "", (("functions.get_weather:0", "get_weather", '{"city": "Bei'),), args_are_json=False,
    ),
    Case(
        "call_without_argument_marker",
        f"<think>go</think>{SEC_B}{CALL_B}functions.ping:0{CALL_E}{SEC_E}done",
        "go", "done", (("functions.ping:0", "ping", ""),), args_are_json=False,
    ),
    Case(
        "tools_disabled_markers_dropped",
        f'<think>r{SEC_B}{CALL_B}functions.f:0{ARG_B}{{}}{CALL_E}{SEC_E}',
        "r", "functions.f:0{}", tools_enabled=False,
    ),
    Case(
        "dangling_partial_marker",
        "<think>r</think>Answer <|tool_call_be",
        "r", "Answer <|tool_call_be", markers_in_output=True,
    ),
]  # fmt: skip


@dataclass
class Collected:
    reasoning: str = ""
    content: str = ""
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, arguments]


def _absorb(case: Case, got: Collected, delta: OutputDelta) -> None:
    got.reasoning += delta.reasoning_content
    got.content += delta.content
    for d in delta.tool_calls:
        if d.id is not None:
            assert d.index not in got.calls and d.name is not None and d.arguments == ""
            got.calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.name is None and d.arguments
            got.calls[d.index][2] += d.arguments
    # Everything streamed so far is a prefix of the final answer: no marker piece leaked and was taken back.
    assert case.reasoning.startswith(got.reasoning)
    assert case.content.startswith(got.content)
    for index, (_, _, arguments) in got.calls.items():
        assert case.calls[index][2].startswith(arguments)


def _run(case: Case, pieces: list[str]) -> Collected:
    parser = K2OutputParser(case.thinking, case.tools_enabled, case.offset)
    got = Collected()
    for piece in pieces:
        _absorb(case, got, parser.feed(piece))
    _absorb(case, got, parser.finish())
    assert got.reasoning == case.reasoning == parser.reasoning_text
    assert got.content == case.content == parser.content_text
    assert [tuple(got.calls[i]) for i in sorted(got.calls)] == list(case.calls)
    assert parser.tool_calls == [ToolCall(*c) for c in case.calls]
    return got


def _ends_with_marker_prefix(text: str) -> bool:
    return any(text.endswith(m[:k]) for m in MARKERS for k in range(1, len(m) + 1))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unsplit_parse(case: Case) -> None:
    _run(case, [case.text])
    for call_id, _, arguments in case.calls:
        assert call_id.startswith("functions.")
        if case.args_are_json:
            json.loads(arguments)
    if not case.markers_in_output:
        for text in (case.reasoning, case.content):
            assert not any(m in text for m in MARKERS)
            assert not _ends_with_marker_prefix(text)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_single_split(case: Case) -> None:
    for cut in range(len(case.text) + 1):
        _run(case, [case.text[:cut], case.text[cut:]])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_char_at_a_time(case: Case) -> None:
    _run(case, list(case.text))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_random_multi_splits(case: Case) -> None:
    rng = random.Random(SEED)
    for _ in range(NUM_RANDOM_SPLITS):
        cuts = sorted(rng.sample(range(len(case.text) + 1), rng.randint(2, MAX_RANDOM_CUTS)))
        bounds = [0, *cuts, len(case.text)]
        _run(case, [case.text[a:b] for a, b in itertools.pairwise(bounds)])


def test_header_delta_comes_before_arguments() -> None:
    parser = K2OutputParser(tool_call_id_offset=1)
    assert parser.feed(f"<think>r</think>{SEC_B}{CALL_B}functions.f:9").tool_calls == []
    header = parser.feed(ARG_B).tool_calls
    assert [(d.index, d.id, d.name, d.arguments) for d in header] == [(0, "functions.f:1", "f", "")]
    args = parser.feed(' {"a": 1} ').tool_calls
    assert [(d.index, d.id, d.name, d.arguments) for d in args] == [(0, None, None, '{"a": 1}')]
    assert parser.feed(f"{CALL_E}{SEC_E}").is_empty
    assert parser.finish().is_empty
    assert parser.tool_calls == [ToolCall("functions.f:1", "f", '{"a": 1}')]


@pytest.mark.parametrize(
    ("thinking", "tokens", "expected"),
    [
        (True, ["<think>", "Hm", "m.", "</think>", "Hi", "!"], 4),
        (True, ["Hm", "m.", "</think>", "Hi"], 3),
        (True, ["<think>", "go", SEC_B, CALL_B, "functions.f:0", ARG_B, "{}", CALL_E, SEC_E], 3),
        (False, ["Hi", "!"], 0),
        (False, ["<think>", "x", "</think>", "Hi"], 3),
    ],
)
def test_is_reasoning_counts_tokens(thinking: bool, tokens: list[str], expected: int) -> None:
    parser = K2OutputParser(thinking=thinking)
    num_reasoning_tokens = 0
    for token_text in tokens:
        was_reasoning = parser.is_reasoning
        parser.feed(token_text)
        num_reasoning_tokens += was_reasoning or parser.is_reasoning
    assert num_reasoning_tokens == expected


def test_marker_inside_arguments_and_tool_call_outside_section() -> None:
    # A call begin in reasoning opens a section implicitly; think tags inside arguments are argument text.
    parsed = parse_k2_output(f'<think>r {CALL_B}functions.f:0{ARG_B}{{"s": "<think>"}}{CALL_E}{SEC_E}tail')
    assert (parsed.reasoning_text, parsed.content_text) == ("r ", "tail")
    assert parsed.tool_calls == [ToolCall("functions.f:0", "f", '{"s": "<think>"}')]


def test_call_with_empty_name_is_dropped() -> None:
    parsed = parse_k2_output(
        f'{SEC_B}{CALL_B}:0{ARG_B}{{"x": 1}}{CALL_E}{CALL_B}g:1{ARG_B}{{}}{CALL_E}{SEC_E}'
    )
    assert parsed.tool_calls == [ToolCall("functions.g:0", "g", "{}")]


def test_output_cut_inside_a_call_id_yields_no_call() -> None:
    # `functions.get_wea` is a prefix of a declared name, not a call: the output ran out inside the id.
    parsed = parse_k2_output(f'{SEC_B}{CALL_B}functions.f:0{ARG_B}{{}}{CALL_E}{CALL_B}functions.get_wea')
    assert parsed.tool_calls == [ToolCall("functions.f:0", "f", "{}")]
    complete = parse_k2_output(f'{SEC_B}{CALL_B}functions.g:0{CALL_E}{SEC_E}')  # an id that did end
    assert complete.tool_calls == [ToolCall("functions.g:0", "g", "")]


def test_feed_after_finish_raises_and_finish_is_idempotent() -> None:
    parser = K2OutputParser()
    parser.feed("<think>a")
    assert parser.finish().is_empty
    assert parser.finish().is_empty
    with pytest.raises(RuntimeError):
        parser.feed("b")


@pytest.mark.parametrize(
    ("raw_id", "name"),
    [
        ("functions.get_weather:0", "get_weather"),
        (" get_weather:12 ", "get_weather"),
        ("functions.mcp.fs.read:3", "mcp.fs.read"),
        ("ns:tool:4", "ns:tool"),
        ("get_weather", "get_weather"),
        ("functions.:1", ""),
    ],
)
def test_tool_name_from_id(raw_id: str, name: str) -> None:
    assert tool_name_from_id(raw_id) == name


def test_token_by_token_with_tiny_tokenizer() -> None:
    from k2ray.api.tokenizer import K2Tokenizer
    from k2ray.model.default_checkpoint import tiny_checkpoint_dir

    tokenizer = K2Tokenizer.from_pretrained(tiny_checkpoint_dir())
    reasoning, content, arguments = "Weather? ok.", "Checking.", '{"city": "Beijing"}'
    text = f"<think>{reasoning}</think>{content}{SEC_B}{CALL_B}functions.get_weather:0{ARG_B}{arguments}{CALL_E}{SEC_E}"
    parser = K2OutputParser(tool_call_id_offset=2)
    num_reasoning_tokens = 0
    for token_id in tokenizer.encode(text):
        was_reasoning = parser.is_reasoning
        parser.feed(tokenizer.decode([token_id]))
        num_reasoning_tokens += was_reasoning or parser.is_reasoning
    parser.finish()
    assert (parser.reasoning_text, parser.content_text) == (reasoning, content)
    assert parser.tool_calls == [ToolCall("functions.get_weather:2", "get_weather", arguments)]
    assert num_reasoning_tokens == len(tokenizer.encode(reasoning)) + 2  # plus <think> and </think>
