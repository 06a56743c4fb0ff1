"""A pydantic ValidationError of a request body -> one 400 naming the field as the client wrote it.

Pydantic's `loc` names union members too (`messages.0.content.str`, `tool_choice.NamedToolChoice`,
`content.list[tagged-union[...]].0.tool_use.input`); those tags are dropped by walking the request
model's annotations alongside the loc, and the path is written `messages[0].content`.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from k2ray.serve.http.errors import ApiError, invalid_request

_VALUE_ERROR_PREFIX = "Value error, "
_SEQUENCE_ORIGINS = (list, tuple, set, frozenset)


def _unwrap(annotation: Any) -> Any:
    """Annotated[X, ...] -> X and X | None -> X (pydantic tags neither in a loc)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif _is_union(annotation) and len(_members(annotation)) == 1:
            annotation = _members(annotation)[0]
        else:
            return annotation


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _members(annotation: Any) -> list[Any]:
    return [m for m in get_args(annotation) if m is not type(None)]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _matches_tag(member: Any, tag: str) -> bool:
    member = _unwrap(member)
    if _is_model(member):  # by class name, or by discriminator value (a Literal field)
        return member.__name__ == tag or any(
            get_origin(f.annotation) is Literal and tag in get_args(f.annotation) for f in member.model_fields.values())
    origin = get_origin(member) or member
    name = "literal" if origin is Literal else getattr(origin, "__name__", "")
    return name == tag.split("[", 1)[0]


def _child(annotation: Any, part: str | int) -> Any:
    """The annotation of `part` inside `annotation`, or None where the walk cannot follow."""
    if _is_model(annotation) and isinstance(part, str):
        for name, field in annotation.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return None
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in _SEQUENCE_ORIGINS and isinstance(part, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def field_path(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """`loc` as the client's field path, union member tags left out: `tools[0].function.parameters`."""
    path = ""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if _is_union(annotation) and isinstance(part, str):  # a union member's tag, not a field
            annotation = next((m for m in _members(annotation) if _matches_tag(m, part)), None)
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        annotation = None if annotation is None else _child(annotation, part)
    return path


def from_validation_error(exc: ValidationError, model: type[BaseModel]) -> ApiError:
    errors = exc.errors(include_input=False, include_url=False)
    if not errors:
        return invalid_request("Invalid request")
    if errors[0]["type"] == "json_invalid":
        return invalid_request(f"Invalid JSON body: {errors[0]['msg']}")
    # Of a union's member errors the deepest says most (`content[0].text: Field required`, not `content:
    # Input should be a valid string`).
    first = max(errors, key=lambda e: len(e["loc"]))
    message = first["msg"].removeprefix(_VALUE_ERROR_PREFIX)
    path = field_path(model, tuple(first["loc"]))
    if not path:  # a check across fields
        return invalid_request(f"Invalid request: {message}")
    return invalid_request(f"Invalid request: {path}: {message}", param=path)
