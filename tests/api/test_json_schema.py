"""JSON Schema checks of client schemas: tool parameters, Anthropic input_schema, response_format."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2ray.api.anthropic_protocol import ToolSpec
from k2ray.api.json_schema import MAX_ERROR_CHARS, check_json_schema
from k2ray.api.openai_protocol import FunctionDef, JsonSchemaFormat

NOT_A_SCHEMA = {"type": "notatype", "properties": 5}


@pytest.mark.parametrize("schema", [
    {}, {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": {"type": "integer"}},
])
def test_valid_schemas_pass_unchanged(schema):
    assert check_json_schema(schema) is schema


@pytest.mark.parametrize(("schema", "where"), [
    (NOT_A_SCHEMA, "properties"), ({"type": "object", "properties": {"a": {"type": "nope"}}}, "properties.a.type"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "required": "a"}, "required"),
    ({"type": "string", "pattern": "("}, "pattern"),
])
def test_invalid_schemas_say_what_and_where(schema, where):
    with pytest.raises(ValueError, match="not a valid JSON Schema") as exc:
        check_json_schema(schema)
    assert str(exc.value).endswith(f" at {where}")


def test_error_message_is_bounded():
    with pytest.raises(ValueError) as exc:
        check_json_schema({"type": "object", "required": {"k": "v" * 10 * MAX_ERROR_CHARS}})
    assert len(str(exc.value)) < 2 * MAX_ERROR_CHARS


@pytest.mark.parametrize(("model", "body"), [
    (FunctionDef, {"name": "f", "parameters": NOT_A_SCHEMA}),
    (ToolSpec, {"name": "f", "input_schema": NOT_A_SCHEMA}),
    (JsonSchemaFormat, {"name": "f", "schema": NOT_A_SCHEMA}),
])
def test_request_models_refuse_invalid_schemas(model, body):
    with pytest.raises(ValidationError, match="not a valid JSON Schema"):
        model.model_validate(body)
    model.model_validate({**body, next(k for k in body if k != "name"): {"type": "object"}})
