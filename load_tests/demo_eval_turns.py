"""The demo eval's exchanges with the server: one case's turns (the model's call, the eval playing the tool,
the model's answer), and the `$web_search` round trip in Moonshot's echo protocol; each scored into a Tally."""

from __future__ import annotations

import json
from typing import Any

import openai
from demo_eval_cases import DECLINE_TASK, expected_integer, play_tool
from demo_eval_scoring import (
    Tally,
    arguments_match,
    arithmetic_answer,
    call_problem,
    states_values,
    validators,
)

from k2ray.demo.conversations import HeldoutCase
from k2ray.demo.tools import WEB_SEARCH_NAME as SEARCH_NAME
from k2ray.tools import WEB_SEARCH_PARAMETERS

NUM_SAMPLES = 12  # failed checks quoted in the report
SAMPLE_CHARS = 160
SEARCH_FUNCTION = {"type": "function", "function": {"name": SEARCH_NAME, "parameters": WEB_SEARCH_PARAMETERS}}


async def chat(client: openai.AsyncOpenAI, model: str, messages: list[dict], tools: list[dict] | None,
               is_constrained: bool, max_tokens: int):
    """One greedy chat completion; unconstrained passes turn the tool-call grammar off."""
    extra = {} if is_constrained else {"constrain_tool_calls": False}
    return await client.chat.completions.create(model=model, messages=messages, tools=tools or openai.NOT_GIVEN,
                                                max_tokens=max_tokens, temperature=0, extra_body=extra)


def reasoning_of(message: Any) -> str:
    return getattr(message, "reasoning_content", None) or ""


def note(tally: Tally, text: str) -> None:
    if len(tally.samples) < NUM_SAMPLES:
        tally.samples.append(text[:SAMPLE_CHARS])


def count_answer(tally: Tally, message: Any, label: str) -> None:
    tally.num_answers += 1
    if reasoning_of(message).strip():
        tally.num_answers_with_reasoning += 1
    else:
        note(tally, f"{label}: no reasoning_content")


def assistant_turn(message: Any) -> dict[str, Any]:
    """The model's call turn as the client sends it back (reasoning kept: it belongs to the current turn)."""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in message.tool_calls or []]
    return {"role": "assistant", "content": message.content or "", "reasoning_content": reasoning_of(message),
            "tool_calls": calls}


def count_calls(tally: Tally, case_tools: list[dict] | None, choice: Any, label: str) -> list[Any]:
    """Scores every call's validity; the valid ones. The calls of a choice cut by max_tokens are counted apart
    (a call can be cut mid-arguments, with or without the grammar) and none of them is played."""
    message = choice.message
    if choice.finish_reason == "length":
        tally.num_cut_calls += len(message.tool_calls or [])
        return []
    checks = validators(SEARCH_FUNCTION if t.get("type") == "builtin_function" else t for t in case_tools or [])
    valid = []
    for call in message.tool_calls or []:
        tally.num_calls += 1
        problem = call_problem(checks, call.function.name, call.function.arguments)
        if problem is None:
            tally.num_valid_calls += 1
            valid.append(call)
        elif len(tally.invalid_calls) < NUM_SAMPLES:
            tally.invalid_calls.append(f"{label}: {problem} {call.function.name}({call.function.arguments})")
    return valid


async def run_case(client: openai.AsyncOpenAI, model: str, case: HeldoutCase, is_constrained: bool, max_tokens: int,
                   tally: Tally) -> None:
    try:
        await _run_case(client, model, case, is_constrained, max_tokens, tally)
    except openai.APIError as exc:
        tally.num_errors += 1
        note(tally, f"{case.task}: {type(exc).__name__}: {exc}")


async def _run_case(client: openai.AsyncOpenAI, model: str, case: HeldoutCase, is_constrained: bool,
                    max_tokens: int, tally: Tally) -> None:
    choice = (await chat(client, model, case.messages, case.tools, is_constrained, max_tokens)).choices[0]
    first, label = choice.message, f"{case.task} {case.messages[-1]['content']!r}"
    count_answer(tally, first, label)
    valid = count_calls(tally, case.tools, choice, label)
    calls = first.tool_calls or []
    if case.expected_tool is not None:
        tally.num_expected_calls += 1
        name, arguments = case.expected_tool, case.expected_arguments or {}
        if calls and calls[0].function.name == name and arguments_match(arguments, calls[0].function.arguments):
            tally.num_right_arguments += 1
        else:
            note(tally, f"{label}: wanted {name}({json.dumps(arguments)}), got "
                        f"{[(c.function.name, c.function.arguments) for c in calls]} {first.content!r}")
    if (expected := expected_integer(case)) is not None:
        tally.num_arithmetic += 1
        if not calls and arithmetic_answer(first.content) == expected:
            tally.num_arithmetic_right += 1
        else:
            note(tally, f"{label}: wanted {expected}, got {first.content!r}")
    if case.task == DECLINE_TASK:
        tally.num_declines += 1
        if not calls and (first.content or "").strip():
            tally.num_declined += 1
        else:
            note(tally, f"{label}: did not decline: {first.content!r} {len(calls)} calls")
    if valid and len(valid) == len(calls):
        await _answer_from_results(client, model, case, first, is_constrained, max_tokens, tally, label)


async def _answer_from_results(client: openai.AsyncOpenAI, model: str, case: HeldoutCase, first: Any,
                               is_constrained: bool, max_tokens: int, tally: Tally, label: str) -> None:
    """Plays each call's tool, sends the results back, and checks the answer states their values."""
    results = [play_tool(c.function.name, c.function.arguments, case) for c in first.tool_calls]
    messages = [*case.messages, assistant_turn(first),
                *({"role": "tool", "tool_call_id": c.id, "name": c.function.name, "content": r.content}
                  for c, r in zip(first.tool_calls, results, strict=True))]
    answer = (await chat(client, model, messages, case.tools, is_constrained, max_tokens)).choices[0].message
    count_answer(tally, answer, f"{label} (answer)")
    tally.num_tool_answers += 1
    values = [v for r in results for v in r.stated_values]
    if not answer.tool_calls and states_values(answer.content, values):
        tally.num_answers_stating_values += 1
    else:
        note(tally, f"{label}: answer {answer.content!r} misses {values}")


def billed_searches(response: Any) -> int:
    usage = response.usage.model_dump() if response.usage is not None else {}
    return (usage.get("server_tool_use") or {}).get("web_search_requests", 0)


async def run_search_round_trip(client: openai.AsyncOpenAI, model: str, case: HeldoutCase, is_constrained: bool,
                                max_tokens: int, tally: Tally) -> None:
    """The call ends the first response; the client echoes its arguments; the second request searches."""
    tally.num_billed_searches, tally.is_search_answer_quoting = 0, False
    label = f"$web_search {case.messages[-1]['content']!r}"
    try:
        first = await chat(client, model, case.messages, case.tools, is_constrained, max_tokens)
        message = first.choices[0].message
        count_answer(tally, message, label)
        valid = count_calls(tally, case.tools, first.choices[0], label)
        tally.num_billed_searches += billed_searches(first)
        if len(valid) != 1 or valid[0].function.name != SEARCH_NAME:
            note(tally, f"{label}: not one $web_search call: {message.content!r} {message.tool_calls}")
            return
        call = valid[0]
        echoed = [*case.messages, assistant_turn(message),
                  {"role": "tool", "tool_call_id": call.id, "name": SEARCH_NAME, "content": call.function.arguments}]
        second = await chat(client, model, echoed, case.tools, is_constrained, max_tokens)
    except openai.APIError as exc:
        tally.num_errors += 1
        note(tally, f"{label}: {type(exc).__name__}: {exc}")
        return
    tally.num_billed_searches += billed_searches(second)
    answer = second.choices[0].message
    count_answer(tally, answer, f"{label} (answer)")
    tally.is_search_answer_quoting = states_values(answer.content, case.expected_answer_values)
    if not tally.is_search_answer_quoting:
        note(tally, f"{label}: answer {answer.content!r} does not quote {case.expected_answer_values}")
