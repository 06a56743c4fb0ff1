from __future__ import annotations

from pathlib import Path

import pytest

from k2ray.api import tokenizer as tokenizer_module
from k2ray.api.chat_template import ChatTemplate, ChatTemplateOptions
from k2ray.api.tokenizer import K2Tokenizer

TINY_DIR = Path(tokenizer_module.__file__).resolve().parents[1] / "assets" / "k2-tiny"
SYSTEM = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "搜索网页",
                                                "parameters": {"type": "object"}}}


def _call(idx: int, name: str, arguments: str | dict) -> dict:
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool(idx: int, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": f"functions.{name}:{idx}", "name": name, "content": content}


WEATHER_ROUND_TRIP = [
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "content": "", "reasoning_content": "...",
     "tool_calls": [_call(0, "get_weather", '{"city": "Beijing"}')]},
    _tool(0, "get_weather", '{"weather": "Sunny"}'),
]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi", "name": "alice"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "simple sum"},
    {"role": "user", "content": "Thanks"},
]
PARTIAL = [
    {"role": "user", "content": "Write a haiku."},
    {"role": "assistant", "content": "Autumn moon", "reasoning_content": "five syllables", "partial": True},
]
# (messages, tools, render kwargs)
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello"}], None, {}),
    (MULTI_TURN, None, {}),
    (WEATHER_ROUND_TRIP, [WEATHER_TOOL], {}),
    ([  # several calls in one message, two results, final answer, then a new turn: history loses reasoning
        {"role": "user", "content": "Weather in Beijing and news?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "two tools",
         "tool_calls": [_call(0, "get_weather", '{"city":"Beijing"}'), _call(1, "search", {"q": "新闻"})]},
        _tool(0, "get_weather", "Sunny"), _tool(1, "search", "no news"),
        {"role": "assistant", "content": "Sunny, no news.", "reasoning_content": "summarize"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": None, "reasoning_content": "call again",
         "tool_calls": [_call(2, "get_weather", {"city": "Beijing", "day": 1})]},
        _tool(2, "get_weather", "Rain"),
    ], [WEATHER_TOOL, SEARCH_TOOL], {}),
    ([  # parts content, empty text part, image part
        {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": ""},
                                     {"type": "image_url", "image_url": {"url": "data:,"}},
                                     {"type": "text", "text": "this."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": ""}]},
    ], None, {}),
    ([  # empty and None contents
        {"role": "system", "content": None},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": None, "reasoning_content": None},
        {"role": "user", "content": None},
    ], None, {}),
    ([{"role": "user", "content": "No thinking please."}], None, {"thinking": False}),
    (MULTI_TURN, None, {"add_generation_prompt": False}),
    (PARTIAL, None, {}),
    (WEATHER_ROUND_TRIP + [{"role": "assistant", "content": "It is", "reasoning_content": "sunny",
                            "partial": True}], [WEATHER_TOOL], {"thinking": False}),
    ([  # other roles use the system header; names override roles
        {"role": "developer", "content": "dev note"},
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "functions.x:0", "content": "orphan result"},
        {"role": "assistant", "name": "kimi", "content": "ok", "tool_calls": []},
    ], [], {}),
    ([], [SEARCH_TOOL], {}),
]


@pytest.fixture(scope="module")
def jinja_template() -> ChatTemplate:
    template = ChatTemplate.from_checkpoint(TINY_DIR)
    assert template.source is not None
    return template


@pytest.mark.parametrize("options", [ChatTemplateOptions(),
                                     ChatTemplateOptions(tools_json_separators=(", ", ": "), sort_tool_keys=False)])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_builtin_and_jinja_are_identical(jinja_template: ChatTemplate, case: int,
                                         options: ChatTemplateOptions) -> None:
    messages, tools, kwargs = CONVERSATIONS[case]
    jinja = ChatTemplate(jinja_template.source, options)
    builtin = ChatTemplate(None, options)
    assert jinja.render(messages, tools, **kwargs) == builtin.render(messages, tools, **kwargs)


def test_k2_facts_rendered_example() -> None:
    # k2_facts §4 example, rendered with llama.cpp's json separators and unsorted keys.
    template = ChatTemplate.from_checkpoint(TINY_DIR, ChatTemplateOptions(tools_json_separators=(", ", ": "),
                                                                          sort_tool_keys=False))
    tool = {"type": "function", "function": {"name": "get_weather"}}
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": {"name": "get_weather"}}]<|im_end|>'
        + SYSTEM + "<|im_user|>user<|im_middle|>Weather in Beijing?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>...</think><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}<|im_end|>'
        + GEN
    )
    assert template.render(WEATHER_ROUND_TRIP, [tool]) == expected


def test_default_tool_declaration_is_compact_and_sorted() -> None:
    text = ChatTemplate.from_checkpoint(TINY_DIR).render([{"role": "user", "content": "q"}], [SEARCH_TOOL])
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"搜索网页",'
                           '"name":"search","parameters":{"type":"object"}},"type":"function"}]<|im_end|>' + SYSTEM)


def test_history_reasoning_dropped_and_thinking_off() -> None:
    expected = (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>alice<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>Hello!<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"
        "<|im_user|>user<|im_middle|>Thanks<|im_end|>" + GEN + "<think></think>"
    )
    assert ChatTemplate.from_checkpoint(TINY_DIR).render(MULTI_TURN, thinking=False) == expected


def test_partial_assistant_is_left_open() -> None:
    expected = (SYSTEM + "<|im_user|>user<|im_middle|>Write a haiku.<|im_end|>"
                + GEN + "<think>five syllables</think>Autumn moon")
    assert ChatTemplate.from_checkpoint(TINY_DIR).render(PARTIAL) == expected
    assert ChatTemplate().render(PARTIAL, thinking=False) == expected


def test_suffix_keeps_reasoning_and_dict_arguments_use_tojson() -> None:
    text = ChatTemplate().render(CONVERSATIONS[3][0])
    assert "<think></think>Let me check." in text and "<think>summarize" not in text
    assert "<think>call again</think><|tool_calls_section_begin|>" in text
    assert '{"city": "Beijing", "day": 1}' in text and '{"q": "新闻"}' in text


def test_without_jinja_file_uses_builtin(tmp_path: Path) -> None:
    template = ChatTemplate.from_checkpoint(tmp_path)
    assert template.source is None
    assert template.render([{"role": "user", "content": "Hello"}]) == (
        SYSTEM + "<|im_user|>user<|im_middle|>Hello<|im_end|>" + GEN)


def test_template_without_thinking_variable_still_disables_thinking() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}")
    assert template.render([{"role": "user", "content": "x"}], thinking=False) == "x" + GEN + "<think></think>"


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_builtin_and_jinja_segments_give_the_same_ids(jinja_template: ChatTemplate, case: int) -> None:
    tok = K2Tokenizer.from_pretrained(TINY_DIR)
    messages, tools, kwargs = CONVERSATIONS[case]
    jinja = jinja_template.render_segments(messages, tools, **kwargs)
    builtin = ChatTemplate().render_segments(messages, tools, **kwargs)
    assert tok.encode_segments(jinja) == tok.encode_segments(builtin)
    # Only trusted text holds control tokens; with no special-token strings in the request, that is all of them.
    assert tok.encode_segments(jinja) == tok.encode(jinja_template.render(messages, tools, **kwargs))


def test_thinking_off_suffix_of_a_template_without_thinking_is_trusted() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}")
    segments = template.render_segments([{"role": "user", "content": "<think>"}], thinking=False)
    assert [(s.text, s.is_trusted) for s in segments] == [
        ("<think>", False), (GEN + "<think></think>", True)]
