"""The demo's client tools, exactly as clients declare them, and their deterministic implementations.

`get_weather` and `convert_units` are the schemas the demo model was trained on (README lists them); the
functions here are what an eval client runs to answer the calls. `$web_search` is Moonshot's builtin.
"""

from __future__ import annotations

import hashlib
from typing import Any

UNITS = ("km", "mi", "m", "ft", "kg", "lb", "c", "f")
# Linear units -> their size in the dimension's base unit (m, kg); c/f are affine, handled apart.
_LINEAR_FACTORS = {"km": 1000.0, "mi": 1609.344, "m": 1.0, "ft": 0.3048, "kg": 1.0, "lb": 0.45359237}
UNIT_DIMENSIONS = {"km": "length", "mi": "length", "m": "length", "ft": "length", "kg": "mass", "lb": "mass",
                   "c": "temperature", "f": "temperature"}
RESULT_DECIMALS = 2
CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "partly cloudy", "stormy")
MIN_TEMPERATURE_C, TEMPERATURE_SPAN_C = -10, 46

GET_WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
CONVERT_UNITS_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "convert_units",
        "description": "Convert a value from one unit to another.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number", "description": "The value to convert"},
                "from_unit": {"type": "string", "enum": list(UNITS)},
                "to_unit": {"type": "string", "enum": list(UNITS)},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    },
}
WEB_SEARCH_NAME = "$web_search"
WEB_SEARCH_TOOL: dict[str, Any] = {"type": "builtin_function", "function": {"name": WEB_SEARCH_NAME}}
CLIENT_TOOLS = {"get_weather": GET_WEATHER_TOOL, "convert_units": CONVERT_UNITS_TOOL, WEB_SEARCH_NAME: WEB_SEARCH_TOOL}


def get_weather(city: str) -> dict[str, Any]:
    """A fixed fake reading per city (a hash of the name), so answers can be checked."""
    digest = hashlib.sha256(city.strip().lower().encode()).digest()
    return {"city": city, "temperature_c": MIN_TEMPERATURE_C + digest[0] % TEMPERATURE_SPAN_C,
            "condition": CONDITIONS[digest[1] % len(CONDITIONS)]}


def convert(value: float, from_unit: str, to_unit: str) -> float:
    if UNIT_DIMENSIONS[from_unit] != UNIT_DIMENSIONS[to_unit]:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    if UNIT_DIMENSIONS[from_unit] == "temperature":
        celsius = value if from_unit == "c" else (value - 32) * 5 / 9
        result = celsius if to_unit == "c" else celsius * 9 / 5 + 32
    else:
        result = value * _LINEAR_FACTORS[from_unit] / _LINEAR_FACTORS[to_unit]
    return round(result, RESULT_DECIMALS)


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """The tool result for a convert_units call (an `error` field for units that do not convert)."""
    try:
        return {"value": value, "from_unit": from_unit, "to_unit": to_unit,
                "result": convert(value, from_unit, to_unit)}
    except (KeyError, ValueError) as e:
        return {"error": str(e)}
