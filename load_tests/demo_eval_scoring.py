"""The demo eval's scoring (load_tests/demo_eval.py): pure functions over what the server answered.

A tool call is valid when its name is declared and its arguments parse as JSON and validate against that
tool's schema; its arguments are right when they equal the case's expected ones (strings case-insensitive,
numbers to a relative tolerance); an answer after a tool result states the returned values when each
appears in it as a word (numbers as numbers: "21" is not found in "210"); an arithmetic answer is right
when the last integer in it is the expected one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\d)")
INTEGER = re.compile(r"(?<![\w.])-?\d+(?![\w.]*\d)")
REL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Targets:
    """The issue's bars: shares in [0, 1]."""

    valid_unconstrained: float = 0.95
    valid_constrained: float = 1.0
    right_arguments: float = 0.90
    arithmetic: float = 0.90
    states_values: float = 0.90
    reasoning: float = 1.0
    num_billed_searches: int = 1


@dataclass
class Tally:
    """Counts of one pass (constrained or not) over every case."""

    num_calls: int = 0  # of choices that finished (not cut by max_tokens)
    num_cut_calls: int = 0
    num_valid_calls: int = 0
    num_expected_calls: int = 0
    num_right_arguments: int = 0
    num_arithmetic: int = 0
    num_arithmetic_right: int = 0
    num_tool_answers: int = 0
    num_answers_stating_values: int = 0
    num_declines: int = 0
    num_declined: int = 0
    num_answers: int = 0
    num_answers_with_reasoning: int = 0
    num_errors: int = 0
    num_billed_searches: int | None = None  # the $web_search round trip's searches; None: not run
    is_search_answer_quoting: bool | None = None
    samples: list[str] = field(default_factory=list)
    invalid_calls: list[str] = field(default_factory=list)  # every invalid call, quoted


def validators(tools: Iterable[Mapping[str, Any]]) -> dict[str, Draft202012Validator]:
    """Name -> schema validator of OpenAI-shaped function tools."""
    out = {}
    for tool in tools:
        schema = tool["function"].get("parameters") or {"type": "object"}
        Draft202012Validator.check_schema(schema)
        out[tool["function"]["name"]] = Draft202012Validator(schema)
    return out


def call_problem(checks: Mapping[str, Draft202012Validator], name: str, arguments: str) -> str | None:
    """Why a tool call is invalid (None: it is valid)."""
    if name not in checks:
        return "undeclared"
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return "unparsable"
    return None if checks[name].is_valid(value) else "schema_invalid"


def _same(expected: Any, got: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    if isinstance(expected, int | float) and isinstance(got, int | float):
        return math.isclose(expected, got, rel_tol=REL_TOLERANCE, abs_tol=REL_TOLERANCE)
    if isinstance(expected, str) and isinstance(got, str):
        return expected.strip().casefold() == got.strip().casefold()
    return expected == got


def arguments_match(expected: Mapping[str, Any], arguments: str) -> bool:
    """The call's arguments hold exactly the expected keys with equal values."""
    try:
        got = json.loads(arguments)
    except json.JSONDecodeError:
        return False
    return isinstance(got, dict) and got.keys() == expected.keys() and all(
        _same(value, got[key]) for key, value in expected.items())


def _numbers(text: str) -> list[float]:
    return [float(m) for m in NUMBER.findall(text.replace(",", ""))]


def states_value(answer: str, value: Any) -> bool:
    """`value` appears in the answer: a number as a number (equal to the tolerance), text as a word."""
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, int | float):
        return any(math.isclose(n, value, rel_tol=REL_TOLERANCE, abs_tol=REL_TOLERANCE) for n in _numbers(answer))
    pattern = r"(?<!\w)" + re.escape(str(value).strip()) + r"(?!\w)"
    return re.search(pattern, answer, re.IGNORECASE) is not None


def states_values(answer: str | None, values: Iterable[Any]) -> bool:
    return bool(answer) and all(states_value(answer, v) for v in values)


def arithmetic_answer(answer: str | None) -> int | None:
    """The last integer of the answer: the result, after any restated operands."""
    found = INTEGER.findall((answer or "").replace(",", ""))
    return int(found[-1]) if found else None


def share(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def rows(tally: Tally) -> list[tuple[str, int, int]]:
    """(metric, hits, total) in table order."""
    return [("tool calls valid (JSON, schema)", tally.num_valid_calls, tally.num_calls),
            ("expected calls with right arguments", tally.num_right_arguments, tally.num_expected_calls),
            ("arithmetic answers right", tally.num_arithmetic_right, tally.num_arithmetic),
            ("answers after a tool result stating its values", tally.num_answers_stating_values,
             tally.num_tool_answers),
            ("declines without a call", tally.num_declined, tally.num_declines),
            ("answers with reasoning_content", tally.num_answers_with_reasoning, tally.num_answers)]


def shortfalls(tally: Tally, is_constrained: bool, targets: Targets) -> list[str]:
    """Each target this pass missed, in words (empty: all met)."""
    bars = [("tool calls valid", tally.num_valid_calls, tally.num_calls,
             targets.valid_constrained if is_constrained else targets.valid_unconstrained),
            ("right arguments", tally.num_right_arguments, tally.num_expected_calls, targets.right_arguments),
            ("arithmetic", tally.num_arithmetic_right, tally.num_arithmetic, targets.arithmetic),
            ("answers stating returned values", tally.num_answers_stating_values, tally.num_tool_answers,
             targets.states_values),
            ("reasoning_content", tally.num_answers_with_reasoning, tally.num_answers, targets.reasoning)]
    out = [f"{name}: no cases" if total == 0 else f"{name}: {hits}/{total} below {bar:.0%}"
           for name, hits, total, bar in bars if total == 0 or hits / total < bar]
    if tally.num_errors:
        out.append(f"{tally.num_errors} requests failed")
    if tally.num_billed_searches is not None and tally.num_billed_searches != targets.num_billed_searches:
        out.append(f"$web_search round trip billed {tally.num_billed_searches} searches, "
                   f"not {targets.num_billed_searches}")
    return out


def format_table(tallies: Mapping[str, Tally]) -> str:
    """One column per pass: hits/total (share)."""
    names = list(tallies)
    metrics = [name for name, _, _ in rows(next(iter(tallies.values())))]
    cells = {p: [f"{h}/{t} ({h / t:.1%})" if t else "n/a" for _, h, t in rows(tallies[p])] for p in names}
    searches = {p: "not run" if t.num_billed_searches is None else
                f"{t.num_billed_searches} billed, answer {'quotes' if t.is_search_answer_quoting else 'misses'}"
                f" the result" for p, t in tallies.items()}
    metrics += ["tool calls cut by max_tokens (not scored)", "$web_search round trip"]
    for p in names:
        cells[p] += [str(tallies[p].num_cut_calls), searches[p]]
    width = max(map(len, metrics))
    widths = {p: max(len(p), *map(len, cells[p])) for p in names}
    lines = ["  ".join([f"{'metric':<{width}}", *(f"{p:<{widths[p]}}" for p in names)])]
    for i, metric in enumerate(metrics):
        lines.append("  ".join([f"{metric:<{width}}", *(f"{cells[p][i]:<{widths[p]}}" for p in names)]))
    return "\n".join(line.rstrip() for line in lines)
