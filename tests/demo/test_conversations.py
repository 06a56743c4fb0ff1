import json

import pytest

from k2ray.demo import templates as T
from k2ray.demo.conversations import TASKS, heldout_cases, training_conversations
from k2ray.demo.phrasing import is_heldout, split_templates
from k2ray.demo.tools import CONVERT_UNITS_TOOL, GET_WEATHER_TOOL, convert_units, get_weather

NUM_TRAIN = 600


@pytest.fixture(scope="module")
def train():
    return training_conversations(NUM_TRAIN, seed=3)


def _calls(conversation):
    for m in conversation.messages:
        for call in m.get("tool_calls") or []:
            yield call["function"]["name"], json.loads(call["function"]["arguments"])


def _weather_results(conversation):
    calls = {c["id"]: c["function"]["name"] for m in conversation.messages for c in m.get("tool_calls") or []}
    for m in conversation.messages:
        if m["role"] == "tool" and calls[m["tool_call_id"]] == "get_weather":
            yield json.loads(m["content"])


def test_same_seed_same_data_other_seed_other_data(train):
    again = training_conversations(NUM_TRAIN, seed=3)
    assert [c.messages for c in again] == [c.messages for c in train]
    assert [c.messages for c in training_conversations(NUM_TRAIN, seed=4)] != [c.messages for c in train]
    assert heldout_cases("weather", 5, 0) == heldout_cases("weather", 5, 0)


def test_every_task_is_trained_and_every_assistant_turn_thinks(train):
    assert {c.task for c in train} == set(TASKS)
    for conv in train:
        final = conv.messages[-1]
        assert final["role"] == "assistant" and final["reasoning_content"]
        assert all(m.get("reasoning_content") or m.get("_reasoning") for m in conv.messages if m["role"] == "assistant")


def test_heldout_values_never_appear_in_training(train):
    readings: dict[str, set[str]] = {}
    for conv in train:
        calls = list(_calls(conv))
        # A Fahrenheit follow-up converts the temperature get_weather returned, not a sampled value.
        from_weather = any(name == "get_weather" for name, _ in calls)
        for name, args in calls:
            if name == "convert_units" and not from_weather:
                assert not is_heldout(json.dumps(args["value"]), "value")
            elif name == "$web_search":
                assert not is_heldout(args["query"], "doc")
        for result in _weather_results(conv):
            readings.setdefault(result["city"], set()).add(json.dumps(result))
    # Weather readings in training are drawn at random, never the eval client's get_weather: a city's
    # weather cannot be recalled, only copied from the tool result.
    assert max(len(r) for r in readings.values()) > 1
    assert sum(json.dumps(get_weather(city)) in r for city, r in readings.items()) < len(readings) / 4
    for task in ("units", "search"):
        for case in heldout_cases(task, 50, seed=0):
            key, salt = {"units": ("value", "value"), "search": ("query", "doc")}[task]
            value = case.expected_arguments[key]
            assert is_heldout(value if isinstance(value, str) else json.dumps(value), salt)
    for case in heldout_cases("weather", 50, seed=0):
        city = case.expected_arguments["city"]
        assert json.loads(case.conversation.messages[case.conversation.prompt_len + 1]["content"]) == get_weather(city)


def test_template_split_is_disjoint_and_covers_all():
    for templates in (T.ARITHMETIC, T.WEATHER, T.CONVERT, T.SEARCH_WHAT, T.UNSUPPORTED_REQUESTS):
        train, held = split_templates(templates, False), split_templates(templates, True)
        assert held and train and not set(train) & set(held)
        assert sorted(train + held) == sorted(templates)


@pytest.mark.parametrize("task", TASKS)
def test_heldout_cases_carry_checkable_expectations(task):
    cases = heldout_cases(task, 50, seed=0)
    assert len(cases) == 50 and len({json.dumps(c.messages) for c in cases}) > 25
    for case in cases:
        assert case.messages[-1]["role"] == "user"
        if case.expected_tool == "get_weather":
            result = get_weather(case.expected_arguments["city"])
            assert case.expected_answer_values == (str(result["temperature_c"]), result["condition"])
        elif case.expected_tool == "convert_units":
            assert json.dumps(convert_units(**case.expected_arguments)["result"]) in case.expected_answer_values


def test_tools_are_valid_schemas_and_results_are_deterministic():
    from k2ray.api.json_schema import check_json_schema

    for tool in (GET_WEATHER_TOOL, CONVERT_UNITS_TOOL):
        check_json_schema(tool["function"]["parameters"])
    assert get_weather("Paris") == get_weather("Paris")
    assert convert_units(100, "c", "f")["result"] == 212.0
    assert convert_units(1, "mi", "km")["result"] == 1.61
    assert "error" in convert_units(1, "kg", "km")
