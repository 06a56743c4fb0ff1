"""Synthetic K2-format conversations for the demo model, with a held-out split of phrasings and values.

A conversation is what a client sends plus the assistant turns the model should produce: reasoning in
`reasoning_content`, tool calls in OpenAI shape with K2's ids (`functions.NAME:IDX`, IDX counting the
conversation's calls), tool results as the client (or, for `$web_search`, the server) puts them in.
`heldout_cases` gives the eval prompts: phrasings and values that `training_conversations` never uses.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import templates as T
from .phrasing import is_heldout, phrase
from .places import ALL_CITIES
from .search_facts import SearchFact, search_facts, search_tool_text
from .tools import (
    CONDITIONS,
    CONVERT_UNITS_TOOL,
    GET_WEATHER_TOOL,
    MIN_TEMPERATURE_C,
    TEMPERATURE_SPAN_C,
    UNIT_DIMENSIONS,
    WEB_SEARCH_NAME,
    WEB_SEARCH_TOOL,
    convert_units,
    get_weather,
)

TASKS = ("arithmetic", "weather", "units", "search", "decline", "followup")
TASK_WEIGHTS = (0.2, 0.2, 0.17, 0.15, 0.1, 0.18)
W, U, S = GET_WEATHER_TOOL, CONVERT_UNITS_TOOL, WEB_SEARCH_TOOL
CAPABILITIES = {"get_weather": "check the weather", "convert_units": "convert units", WEB_SEARCH_NAME: "search the web"}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are Kimi, a helpful assistant. Answer briefly.",
                  "You are a friendly assistant with access to tools.")
P_SYSTEM, P_ECHO_REASONING, P_TOOL_NAME, P_WORD_NUMBER, P_DECIMAL = 0.2, 0.5, 0.5, 0.2, 0.3
MAX_VALUE, MIN_TEMPERATURE, MAX_TEMPERATURE = 1000, -40, 120


@dataclass(frozen=True)
class Conversation:
    task: str
    tools: list[dict[str, Any]] | None  # as the client declares them ($web_search as a builtin_function)
    messages: list[dict[str, Any]]  # complete, ending with the final assistant answer
    prompt_len: int  # messages[:prompt_len] is the client's request for the turn under test
    # The turn under test: the tool it calls (None: answers directly), the call's arguments, and the
    # strings its final answer contains.
    expected: tuple[str | None, dict[str, Any] | None, tuple[str, ...]]


@dataclass(frozen=True)
class HeldoutCase:
    """One eval prompt: the request, the call it should make (None: answer directly), and the strings its
    final answer must contain once the call's result is in."""

    task: str
    tools: list[dict[str, Any]] | None
    messages: list[dict[str, Any]]
    expected_tool: str | None
    expected_arguments: dict[str, Any] | None
    expected_answer_values: tuple[str, ...]
    conversation: Conversation = field(repr=False)


def _num(value: float) -> str:
    return json.dumps(value)


class _Builder:
    """Appends turns in K2's format, numbering tool calls across the conversation."""

    def __init__(self, rng: random.Random, tools: list[dict] | None):
        self.rng, self.tools, self.messages = rng, tools, []
        self.num_calls = 0
        self.echo_reasoning = rng.random() < P_ECHO_REASONING
        self.tool_name = rng.random() < P_TOOL_NAME
        if rng.random() < P_SYSTEM:
            self.messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        self.expected: tuple[str | None, dict | None, tuple[str, ...]] = (None, None, ())

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def call(self, name: str, arguments: dict[str, Any], reasoning: str, result: str) -> None:
        call_id = f"functions.{name}:{self.num_calls}"
        self.num_calls += 1
        message = {"role": "assistant", "content": "", "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]}
        if self.echo_reasoning:
            message["reasoning_content"] = reasoning
        self.messages.append(message)
        tool = {"role": "tool", "tool_call_id": call_id, "content": result}
        if self.tool_name or name == WEB_SEARCH_NAME:
            tool["name"] = name
        self.messages.append(tool)
        self.messages[-2]["_reasoning"] = reasoning  # the training target keeps it either way

    def answer(self, reasoning: str, content: str) -> None:
        self.messages.append({"role": "assistant", "content": content, "reasoning_content": reasoning})

    def done(self, task: str, prompt_len: int) -> Conversation:
        return Conversation(task, self.tools, self.messages, prompt_len, self.expected)


def _tools(rng: random.Random, options: list[list[dict] | None]) -> list[dict] | None:
    tools = rng.choice(options)
    return None if tools is None else list(tools)


def _digit(value: int, rng: random.Random) -> str:
    return T.NUMBER_WORDS[value] if 0 <= value <= 9 and rng.random() < P_WORD_NUMBER else str(value)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_turn(b: _Builder, heldout: bool, a: int, op: str, c: int) -> int:
    rng = b.rng
    b.user(phrase(T.ARITHMETIC, heldout, rng, a=_digit(a, rng), op=rng.choice(T.OP_FORMS[op]), b=_digit(c, rng)))
    r = _apply(a, op, c)
    b.answer(f"The user wants {a} {T.OP_WORDS[op]} {c}. {a} {op} {c} = {r}.", f"{a} {op} {c} = {r}.")
    b.expected = (None, None, (str(r),))
    return r


def arithmetic(rng: random.Random, heldout: bool) -> Conversation:
    b = _Builder(rng, _tools(rng, [None, None, None, [W], [U], [W, U, S]]))
    _arith_turn(b, heldout, rng.randrange(10), rng.choice("+-×"), rng.randrange(10))
    return b.done("arithmetic", len(b.messages) - 1)


def _pick_city(rng: random.Random, avoid: str = "") -> str:
    # Every city is trained (each is one token, see demo.tokenizer; a token never seen has no meaning to
    # copy); what is held out for weather is the phrasing and the reading, which `_reading` draws at random
    # in training, so the answer must copy the tool result rather than recall a city's weather.
    while True:
        city = rng.choice(ALL_CITIES)
        if city != avoid:
            return city


def _reading(rng: random.Random, heldout: bool, city: str) -> dict:
    """The tool result: the eval client's deterministic get_weather when held out, a random one in training."""
    if heldout:
        return get_weather(city)
    return {"city": city, "temperature_c": MIN_TEMPERATURE_C + rng.randrange(TEMPERATURE_SPAN_C),
            "condition": rng.choice(CONDITIONS)}


def _weather_turn(b: _Builder, heldout: bool, city: str, templates: tuple[str, ...], lead: str) -> dict:
    b.user(phrase(templates, heldout, b.rng, city=city))
    result = _reading(b.rng, heldout, city)
    b.call("get_weather", {"city": city}, f"{lead} {city}. I will call get_weather for {city}.", json.dumps(result))
    t, cond = result["temperature_c"], result["condition"]
    content = b.rng.choice([f"It is {t}°C and {cond} in {city} right now.", f"Right now in {city} it's {t}°C and "
                            f"{cond}.", f"The weather in {city} is {cond}, {t}°C."])
    b.answer(f"get_weather says {city} is {t}°C and {cond}.", content)
    b.expected = ("get_weather", {"city": city}, (str(t), cond))
    return result


def weather(rng: random.Random, heldout: bool) -> Conversation:
    b = _Builder(rng, _tools(rng, [[W], [W, U], [W, S], [W, U, S], [U, W]]))
    _weather_turn(b, heldout, _pick_city(rng), T.WEATHER, "The user asks about the weather in")
    return b.done("weather", _prompt_len(b))


def _prompt_len(b: _Builder) -> int:
    """The request of the turn under test ends at its last user message."""
    return max(i for i, m in enumerate(b.messages) if m["role"] == "user") + 1


def _pick_value(rng: random.Random, heldout: bool, dimension: str) -> float:
    while True:
        if dimension == "temperature":
            value: float = rng.randint(MIN_TEMPERATURE, MAX_TEMPERATURE)
        else:
            value = rng.randint(1, MAX_VALUE)
        if rng.random() < P_DECIMAL:
            value = round(value / 10, 1) if dimension != "temperature" else value + 0.5
        if is_heldout(_num(value), "value") == heldout:
            return value


def _convert_turn(b: _Builder, heldout: bool, value: float, src: str, dst: str, templates: tuple[str, ...],
                  **words: str) -> None:
    rng = b.rng
    words = {"src": rng.choice(T.UNIT_WORDS[src]), "dst": rng.choice(T.UNIT_WORDS[dst])} | words
    b.user(phrase(templates, heldout, rng, value=_num(value), **words))
    args = {"value": value, "from_unit": src, "to_unit": dst}
    result = convert_units(**args)["result"]
    b.call("convert_units", args, f"Convert {_num(value)} {src} to {dst}. I will call convert_units.",
           json.dumps(convert_units(**args)))
    b.answer(f"convert_units returned {_num(result)} {dst}.",
             f"{_num(value)} {T.UNIT_DISPLAY[src]} is {_num(result)} {T.UNIT_DISPLAY[dst]}.")
    b.expected = ("convert_units", args, (_num(result),))


def _unit_pair(rng: random.Random, dimension: str | None = None) -> tuple[str, str]:
    dimension = dimension or rng.choice(["length", "length", "mass", "temperature"])
    units = [u for u, d in UNIT_DIMENSIONS.items() if d == dimension]
    src, dst = rng.sample(units, 2)
    return src, dst


def units(rng: random.Random, heldout: bool) -> Conversation:
    b = _Builder(rng, _tools(rng, [[U], [W, U], [U, S], [W, U, S]]))
    src, dst = _unit_pair(rng)
    _convert_turn(b, heldout, _pick_value(rng, heldout, UNIT_DIMENSIONS[src]), src, dst, T.CONVERT)
    return b.done("units", _prompt_len(b))


def _pick_fact(rng: random.Random, heldout: bool, avoid: str = "") -> SearchFact:
    facts = [f for f in search_facts() if is_heldout(f.subject, "doc") == heldout and f.subject != avoid]
    return rng.choice(facts)


def _search_turn(b: _Builder, heldout: bool, fact: SearchFact, templates: tuple[str, ...] | None = None) -> None:
    rng = b.rng
    if templates is None:
        templates = T.SEARCH_WHO if fact.has_maker and rng.random() < 0.5 else T.SEARCH_WHAT
    b.user(phrase(templates, heldout, rng, subject=fact.subject))
    b.call(WEB_SEARCH_NAME, {"query": fact.subject},
           f"I am not sure about {fact.subject}, so I will search the web for it.", search_tool_text(fact.subject))
    b.answer(f"The top result is {fact.title}; I will quote it.",
             f'I searched the web. The top result says: "{fact.first_sentence}"')
    b.expected = (WEB_SEARCH_NAME, {"query": fact.subject}, (fact.first_sentence,))


def search(rng: random.Random, heldout: bool) -> Conversation:
    b = _Builder(rng, _tools(rng, [[S], [W, S], [S, U], [W, U, S]]))
    _search_turn(b, heldout, _pick_fact(rng, heldout))
    return b.done("search", _prompt_len(b))


def decline(rng: random.Random, heldout: bool) -> Conversation:
    no_weather = rng.random() < 0.25
    options = [None, [U]] if no_weather else [None, [W], [U], [S], [W, U], [W, U, S]]
    b = _Builder(rng, _tools(rng, options))
    city = _pick_city(rng)
    b.user(phrase(T.DECLINE_NO_WEATHER if no_weather else T.UNSUPPORTED_REQUESTS, heldout, rng, city=city))
    names = [t["function"]["name"] for t in b.tools or []]
    if names:
        caps = " and ".join(CAPABILITIES[n] for n in names)
        b.answer("None of my tools can do what the user asks.", f"Sorry, I can't help with that. I can only {caps}.")
    else:
        b.answer("I have no tools for what the user asks.", "Sorry, I can't do that: I have no tool for it here.")
    b.expected = (None, None, ("Sorry",))
    return b.done("decline", len(b.messages) - 1)


def followup(rng: random.Random, heldout: bool) -> Conversation:
    kind = rng.choice(["weather", "fahrenheit", "arithmetic", "units", "search"])
    if kind == "arithmetic":
        b = _Builder(rng, _tools(rng, [None, None, [W, U]]))
        while True:
            a, op, c = rng.randrange(10), rng.choice("+-×"), rng.randrange(10)
            if 0 <= _apply(a, op, c) <= 9:
                break
        r = _arith_turn(b, heldout, a, op, c)
        op2, c2 = rng.choice("+-×"), rng.randrange(10)
        b.user(phrase(T.ARITHMETIC_FOLLOWUP, heldout, rng, op=rng.choice(T.FOLLOWUP_OP_FORMS[op2]), b=_digit(c2, rng)))
        r2 = _apply(r, op2, c2)
        b.answer(f"The previous result was {r}. {r} {op2} {c2} = {r2}.", f"{r} {op2} {c2} = {r2}.")
        b.expected = (None, None, (str(r2),))
    elif kind in ("weather", "fahrenheit"):
        b = _Builder(rng, [W, U] if kind == "fahrenheit" else _tools(rng, [[W], [W, U], [W, U, S]]))
        city = _pick_city(rng)
        first = _weather_turn(b, heldout, city, T.WEATHER, "The user asks about the weather in")
        if kind == "weather":
            _weather_turn(b, heldout, _pick_city(rng, city), T.WEATHER_FOLLOWUP, "The user now asks about")
        else:
            _convert_turn(b, heldout, first["temperature_c"], "c", "f", T.TO_FAHRENHEIT_FOLLOWUP)
    elif kind == "units":
        b = _Builder(rng, _tools(rng, [[U], [W, U]]))
        src, dst = _unit_pair(rng, "length")
        value = _pick_value(rng, heldout, "length")
        _convert_turn(b, heldout, value, src, dst, T.CONVERT)
        dst2 = rng.choice([u for u in ("km", "mi", "m", "ft") if u not in (src, dst)])
        _convert_turn(b, heldout, value, src, dst2, T.CONVERT_FOLLOWUP)
    else:
        b = _Builder(rng, _tools(rng, [[S], [W, S]]))
        fact = _pick_fact(rng, heldout)
        _search_turn(b, heldout, fact)
        _search_turn(b, heldout, _pick_fact(rng, heldout, fact.subject), T.SEARCH_FOLLOWUP)
    return b.done("followup", _prompt_len(b))


BUILDERS: dict[str, Callable[[random.Random, bool], Conversation]] = {
    "arithmetic": arithmetic, "weather": weather, "units": units, "search": search, "decline": decline,
    "followup": followup,
}


def training_conversations(n: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    return [BUILDERS[rng.choices(TASKS, TASK_WEIGHTS)[0]](rng, False) for _ in range(n)]


def heldout_cases(task: str, n: int, seed: int) -> list[HeldoutCase]:
    """`n` eval prompts of `task` (one of TASKS) from held-out templates and values."""
    rng = random.Random(f"heldout:{task}:{seed}")
    cases = []
    for _ in range(n):
        conv = BUILDERS[task](rng, True)
        cases.append(HeldoutCase(task, conv.tools, client_messages(conv.messages[:conv.prompt_len]),
                                 *conv.expected, conversation=conv))
    return cases


def client_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a client sends them (without the training-only `_reasoning` field)."""
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]
