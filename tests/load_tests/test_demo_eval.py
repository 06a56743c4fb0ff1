"""demo_eval: its scoring functions, the cases and tool results it plays, and one bounded run of both passes
through the router app over the real engine in process (the openai SDK on an ASGI transport)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator

import demo_eval
import demo_eval_cases
import httpx
import openai
import pytest
from demo_eval_scoring import (
    Tally,
    Targets,
    arguments_match,
    arithmetic_answer,
    call_problem,
    format_table,
    shortfalls,
    states_value,
    states_values,
    validators,
)
from demo_eval_turns import count_calls
from openai.types.chat.chat_completion import Choice

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.demo.tools import CONVERT_UNITS_TOOL, GET_WEATHER_TOOL
from k2ray.engine.async_engine import AsyncLLMEngine
from k2ray.engine.config import EngineConfig
from k2ray.model.default_checkpoint import default_checkpoint_dir
from k2ray.serve.args import ServedModel
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineRequest
from k2ray.serve.http.router import build_router_app
from k2ray.serve.http.router_context import Admission, RouterContext
from k2ray.tools import WebSearch, WebSearchConfig

CHECKS = validators([GET_WEATHER_TOOL, CONVERT_UNITS_TOOL])
MAX_MODEL_LEN = 2048
MODEL_ID = "demo"


def test_call_problems_follow_the_declared_schemas() -> None:
    assert call_problem(CHECKS, "get_weather", '{"city": "Oslo"}') is None
    assert call_problem(CHECKS, "convert_units", '{"value": 3.5, "from_unit": "km", "to_unit": "mi"}') is None
    assert call_problem(CHECKS, "get_wether", '{"city": "Oslo"}') == "undeclared"
    assert call_problem(CHECKS, "get_weather", '{"city": "Os') == "unparsable"
    assert call_problem(CHECKS, "get_weather", '{"town": "Oslo"}') == "schema_invalid"
    assert call_problem(CHECKS, "convert_units", '{"value": "3", "from_unit": "km", "to_unit": "mi"}') == \
        "schema_invalid"
    assert call_problem(CHECKS, "convert_units", '{"value": 3, "from_unit": "yd", "to_unit": "mi"}') == \
        "schema_invalid"


def test_arguments_match_values_not_spelling() -> None:
    assert arguments_match({"city": "New Delhi"}, '{"city": "new delhi "}')
    assert arguments_match({"value": 35.9, "from_unit": "kg", "to_unit": "lb"},
                           '{"to_unit": "lb", "value": 35.90, "from_unit": "kg"}')
    assert arguments_match({"value": 462, "from_unit": "m", "to_unit": "mi"},
                           '{"value": 462.0, "from_unit": "m", "to_unit": "mi"}')
    assert not arguments_match({"city": "Paris"}, '{"city": "Lyon"}')
    assert not arguments_match({"city": "Paris"}, '{"city": "Paris", "days": 2}')
    assert not arguments_match({"value": 35.9, "from_unit": "kg", "to_unit": "lb"},
                               '{"value": 35.8, "from_unit": "kg", "to_unit": "lb"}')
    assert not arguments_match({"city": "Paris"}, '{"city": ')
    assert not arguments_match({"city": "Paris"}, '["Paris"]')


def test_answers_state_numbers_as_numbers_and_text_as_words() -> None:
    answer = "Right now in Oslo it's -5°C and partly cloudy."
    assert states_values(answer, (-5, "partly cloudy")) and states_values(answer, ("Oslo",))
    assert not states_value(answer, 5) and not states_value("It is 210°C.", 21)
    assert states_value("462 m is 0.29 mi.", 0.29) and not states_value("462 m is 0.3 mi.", 0.29)
    assert states_value("that is 1,276,246.72 ft", 1276246.72)
    assert not states_value("It is sunny.", "rainy") and not states_value("mostly sunnyish", "sunny")
    assert not states_values("", (1,)) and not states_values(None, ())
    assert states_values("Sorry, I can't.", ())


def test_arithmetic_answer_is_the_last_integer() -> None:
    assert arithmetic_answer("5 - 8 = -3.") == -3
    assert arithmetic_answer("6 × 1 = 6") == 6
    assert arithmetic_answer("3-7=-4") == -4
    assert arithmetic_answer("The answer is 12, since 3 × 4 = 12.") == 12
    assert arithmetic_answer("I can't say.") is None and arithmetic_answer(None) is None


def _tally(**counts: int) -> Tally:
    full = {"num_calls": 10, "num_valid_calls": 10, "num_expected_calls": 10, "num_right_arguments": 9,
            "num_arithmetic": 10, "num_arithmetic_right": 9, "num_tool_answers": 10,
            "num_answers_stating_values": 9, "num_answers": 20, "num_answers_with_reasoning": 20,
            "num_billed_searches": 1}
    return Tally(**(full | counts))


def test_shortfalls_name_each_missed_target() -> None:
    assert shortfalls(_tally(), True, Targets()) == []
    assert shortfalls(_tally(num_valid_calls=9), True, Targets()) == ["tool calls valid: 9/10 below 100%"]
    assert shortfalls(_tally(num_valid_calls=19, num_calls=20), False, Targets()) == []
    assert shortfalls(_tally(num_valid_calls=18, num_calls=20), False, Targets()) == [
        "tool calls valid: 18/20 below 95%"]
    missed = shortfalls(_tally(num_answers_with_reasoning=19, num_billed_searches=2, num_errors=1,
                               num_arithmetic=0, num_arithmetic_right=0), True, Targets())
    assert missed == ["arithmetic: no cases", "reasoning_content: 19/20 below 100%", "1 requests failed",
                      "$web_search round trip billed 2 searches, not 1"]


def test_table_has_a_column_per_pass() -> None:
    table = format_table({"constrained": _tally(),
                          "unconstrained": _tally(num_valid_calls=7, num_billed_searches=None)})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "constrained", "unconstrained"]
    valid = re.split(r"\s{2,}", lines[1])
    assert valid == ["tool calls valid (JSON, schema)", "10/10 (100.0%)", "7/10 (70.0%)"]
    assert lines[-1].endswith("not run") and "1 billed, answer misses the result" in lines[-1]


def test_cases_and_played_tools() -> None:
    cases = demo_eval_cases.heldout_eval_cases(4, seed=0)
    assert {c.task for c in cases} == set(demo_eval_cases.EVAL_TASKS) and len(cases) == 20
    arithmetic = [c for c in cases if c.task == "arithmetic"]
    assert all(demo_eval_cases.expected_integer(c) is not None for c in arithmetic)
    assert all(demo_eval_cases.expected_integer(c) is None for c in cases if c.task in ("weather", "decline"))
    weather = demo_eval_cases.play_tool("get_weather", '{"city": "Oslo"}', cases[0])
    reading = json.loads(weather.content)
    assert reading["city"] == "Oslo" and weather.stated_values == (reading["temperature_c"], reading["condition"])
    converted = demo_eval_cases.play_tool("convert_units", '{"value": 1, "from_unit": "km", "to_unit": "m"}',
                                          cases[0])
    assert json.loads(converted.content)["result"] == 1000 and converted.stated_values == (1000,)
    search = demo_eval_cases.search_case(seed=0)
    echoed = demo_eval_cases.play_tool("$web_search", '{"query":  "Hamlet"}', search)
    assert echoed.content == '{"query":  "Hamlet"}' and echoed.stated_values == search.expected_answer_values
    with pytest.raises(ValueError, match="plays no tool"):
        demo_eval_cases.play_tool("book_flight", "{}", cases[0])


def _choice(finish_reason: str, name: str, arguments: str) -> Choice:
    return Choice.model_validate({"index": 0, "finish_reason": finish_reason, "message": {
        "role": "assistant", "content": "", "tool_calls": [
            {"id": f"functions.{name}:0", "type": "function", "function": {"name": name, "arguments": arguments}}]}})


def test_calls_are_scored_unless_max_tokens_cut_them() -> None:
    tally, tools = Tally(), [GET_WEATHER_TOOL, {"type": "builtin_function", "function": {"name": "$web_search"}}]
    assert count_calls(tally, tools, _choice("length", "get_weather", '{"city": "Os'), "cut") == []
    assert (tally.num_calls, tally.num_cut_calls) == (0, 1)
    assert len(count_calls(tally, tools, _choice("tool_calls", "get_weather", '{"city": "Oslo"}'), "ok")) == 1
    assert len(count_calls(tally, tools, _choice("tool_calls", "$web_search", '{"query": "Hamlet"}'), "ok")) == 1
    assert count_calls(tally, tools, _choice("tool_calls", "get_weather", '{"city": 3}'), "bad") == []
    assert count_calls(tally, tools, _choice("tool_calls", "$web_search", '{"q": "Hamlet"}'), "bad") == []
    assert (tally.num_calls, tally.num_valid_calls) == (4, 2)
    assert tally.invalid_calls == ['bad: schema_invalid get_weather({"city": 3})',
                                   'bad: schema_invalid $web_search({"q": "Hamlet"})']


def test_only_loopback_servers() -> None:
    assert demo_eval.check_loopback("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    with pytest.raises(SystemExit, match="loopback"):
        demo_eval.check_loopback("https://api.example.com/v1")


class InProcessEngine:
    """The router's EngineClient over an in-process AsyncLLMEngine (the real engine and grammar)."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        async for out in self.engine.add_request(request.request_id, request.prompt_token_ids,
                                                 request.sampling_params):
            completion = out.outputs[0]
            yield EngineDelta(list(completion.token_ids), num_cached_tokens=out.num_cached_tokens,
                              finish_reason=completion.finish_reason)


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(EngineConfig(model=str(default_checkpoint_dir()), block_size=16, num_kv_blocks=1024,
                                         max_num_batched_tokens=2048, max_num_seqs=32, max_model_len=MAX_MODEL_LEN))
    yield engine
    engine.shutdown()


async def test_both_passes_through_the_router(engine: AsyncLLMEngine, capsys) -> None:
    """Two cases per task on the default checkpoint: every request answers, the grammar's calls are all
    valid, and the table and exit code come out (the random k2-tiny misses the targets; the demo meets them)."""
    checkpoint = default_checkpoint_dir()
    web_search = WebSearch.from_config(WebSearchConfig())
    ctx = RouterContext(tokenizer=K2Tokenizer.from_pretrained(checkpoint),
                        template=ChatTemplate.from_checkpoint(checkpoint), engine=InProcessEngine(engine),
                        models=(ServedModel(id=MODEL_ID),), max_model_len=MAX_MODEL_LEN,
                        admission=Admission(64, retry_after_s=1), web_search=web_search)
    args = demo_eval.parse_args(["--cases-per-task", "2", "--max-tokens", "64"])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_router_app(ctx)), base_url="http://router")
    client = openai.AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
    try:
        tallies = await demo_eval.evaluate(client, args)
    finally:
        await client.close()
        await web_search.aclose()
    assert list(tallies) == ["constrained", "unconstrained"]
    for tally in tallies.values():
        assert tally.num_errors == 0, tally.samples
        assert tally.num_arithmetic >= 2 and tally.num_declines == 2 and tally.num_expected_calls >= 4
        assert tally.num_answers >= 2 * len(demo_eval_cases.EVAL_TASKS) + 1
        assert tally.num_billed_searches is not None
    constrained = tallies["constrained"]
    assert constrained.num_valid_calls == constrained.num_calls
    code = demo_eval.report(tallies, args, 0.0)
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split() == ["metric", "constrained", "unconstrained"]
    assert code == (demo_eval.EXIT_MISSED if "below target" in out.err else 0)
