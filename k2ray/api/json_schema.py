"""JSON Schema checks for schemas clients send (tool parameters, response_format): pure Python."""

from __future__ import annotations

from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for

# A schema error quotes the offending value; keep a huge one from filling the error message.
MAX_ERROR_CHARS = 300


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` itself, once it is valid under its `$schema` draft (2020-12 by default); else ValueError
    with what is wrong and where, for a 400 that names the field."""
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "" if not exc.path else f" at {exc.json_path.removeprefix('$.')}"
        message = exc.message if len(exc.message) <= MAX_ERROR_CHARS else exc.message[:MAX_ERROR_CHARS] + "..."
        raise ValueError(f"not a valid JSON Schema: {message}{where}") from None
    return schema
