"""What the demo eval asks and how it plays the client's tools: k2ray/demo's held-out cases (phrasings and
values training never used) and the tool implementations the demo was trained on (k2ray/demo/tools.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from k2ray.demo.conversations import HeldoutCase, heldout_cases
from k2ray.demo.tools import WEB_SEARCH_NAME, convert_units, get_weather

# The tasks with `--cases-per-task` prompts each (k2ray/demo's names); `search` gets its own round trip.
EVAL_TASKS = ("arithmetic", "weather", "units", "followup", "decline")
SEARCH_TASK = "search"
DECLINE_TASK = "decline"


@dataclass(frozen=True)
class ToolResult:
    content: str  # the tool message's content
    stated_values: tuple[Any, ...]  # what the answer after it must state


def heldout_eval_cases(num_per_task: int, seed: int) -> list[HeldoutCase]:
    return [case for task in EVAL_TASKS for case in heldout_cases(task, num_per_task, seed)]


def search_case(seed: int) -> HeldoutCase:
    return heldout_cases(SEARCH_TASK, 1, seed)[0]


def expected_integer(case: HeldoutCase) -> int | None:
    """The result an arithmetic turn (a first question or a follow-up) must end with; None: not one."""
    if case.expected_tool is not None or case.task == DECLINE_TASK or len(case.expected_answer_values) != 1:
        return None
    value = case.expected_answer_values[0]
    return int(value) if value.lstrip("-").isdigit() else None


def play_tool(name: str, arguments_text: str, case: HeldoutCase) -> ToolResult:
    """The client side of a schema-valid call. `$web_search` is echoed unmodified (Moonshot's protocol: the
    server searches when the arguments come back), so its answer must quote what the case's document says."""
    arguments = json.loads(arguments_text)
    if name == "get_weather":
        result = get_weather(arguments["city"])
        return ToolResult(json.dumps(result), (result["temperature_c"], result["condition"]))
    if name == "convert_units":
        result = convert_units(arguments["value"], arguments["from_unit"], arguments["to_unit"])
        return ToolResult(json.dumps(result), (result["result"],) if "result" in result else ())
    if name == WEB_SEARCH_NAME:
        return ToolResult(arguments_text, case.expected_answer_values)
    raise ValueError(f"the demo eval plays no tool {name!r}")
