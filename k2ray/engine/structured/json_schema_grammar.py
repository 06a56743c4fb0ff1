"""A JSON Schema -> an EBNF grammar whose every sentence validates against the schema and holds no
excluded text (K2's markers), for xgrammar's GrammarFormat.

The grammar may be narrower than the schema (properties in declared order, no undeclared properties,
short digit runs, no raw marker-starting character in a length-bounded string) but never wider. What it
cannot enforce it refuses with a GrammarError naming the keyword and where, so a client gets a 400
rather than output its schema rejects. Supported: type (one or a list), enum, const, properties,
required, additionalProperties, items, minItems, maxItems, minLength, maxLength, minimum, maximum,
exclusiveMinimum, exclusiveMaximum, anyOf, local $ref into $defs/definitions; annotations (title,
description, default, examples, format, ...) are ignored, as JSON Schema 2020-12 does by default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable

from k2ray.engine.structured.json_text_grammar import JsonTextRules, literal

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# Keywords that assert something this converter does not enforce: a schema using one is refused.
UNSUPPORTED = frozenset({
    "allOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "prefixItems", "contains",
    "minContains", "maxContains", "uniqueItems", "pattern", "multipleOf", "contentSchema", "$dynamicRef"})
# Keywords that imply a type when `type` is absent (the grammar then emits that type only: a subset).
_IMPLIED_TYPE = {"properties": "object", "required": "object", "additionalProperties": "object",
                 "items": "array", "minItems": "array", "maxItems": "array", "minLength": "string",
                 "maxLength": "string", "minimum": "number", "maximum": "number", "exclusiveMinimum": "number",
                 "exclusiveMaximum": "number"}
_NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords beside anyOf/$ref that change nothing about the values allowed.
_NEUTRAL = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
                      "definitions", "deprecated", "readOnly", "writeOnly", "format", "$anchor", "discriminator",
                      "unevaluatedProperties", "unevaluatedItems", "strict"})


class GrammarError(ValueError):
    """The requested schema cannot be compiled into a grammar."""


def json_schema_ebnf(schema: dict[str, Any] | bool, excluded_text: Sequence[str], max_whitespace: int) -> str:
    """EBNF (root rule `root`) for JSON values valid against `schema` with none of `excluded_text` in them."""
    converter = _Converter(schema, JsonTextRules(excluded_text, max_whitespace))
    try:
        root = converter.value(schema, "#")
    except GrammarError as exc:
        raise GrammarError(f"unsupported JSON schema: {exc}") from None
    converter.rules["root"] = root
    return "\n".join(f"{name} ::= {body}" for name, body in {**converter.rules, **converter.text.rules}.items())


class _Converter:
    def __init__(self, root: dict[str, Any] | bool, text: JsonTextRules) -> None:
        self.root = root
        self.text = text
        self.rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}
        self._tails: dict[tuple[str, int | None, int], str] = {}

    def _rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules[name] = body
        return name

    def value(self, schema: dict[str, Any] | bool, where: str) -> str:
        """A rule name (or an expression) for the values `schema` allows."""
        if schema is True or schema == {}:
            return self._any()
        if schema is False or not isinstance(schema, dict):
            raise GrammarError(f"the schema at {where} allows no value" if schema is False else
                               f"the schema at {where} must be an object or a boolean")
        unsupported = sorted(UNSUPPORTED & schema.keys())
        if unsupported:
            raise GrammarError(f"keyword '{unsupported[0]}' is not supported (at {where})")
        if "$ref" in schema:
            self._only_neutral_besides(schema, "$ref", where)
            return self._ref(schema["$ref"], where)
        if "anyOf" in schema:
            self._only_neutral_besides(schema, "anyOf", where)
            arms = [self.value(s, f"{where}/anyOf/{i}") for i, s in enumerate(schema["anyOf"])]
            return self._rule(" | ".join(arms))
        if "const" in schema or "enum" in schema:
            return self._literals(schema, where)
        arms = [self._typed(t, schema, where) for t in self._types(schema, where)]
        return arms[0] if len(arms) == 1 else self._rule(" | ".join(arms))

    def _only_neutral_besides(self, schema: dict[str, Any], keyword: str, where: str) -> None:
        others = sorted(k for k in schema.keys() - _NEUTRAL - {keyword} if k in _IMPLIED_TYPE or k in
                        ("type", "enum", "const", "anyOf", "$ref"))
        if others:
            raise GrammarError(f"'{keyword}' beside '{others[0]}' is not supported (at {where})")

    def _types(self, schema: dict[str, Any], where: str) -> list[str]:
        types = schema.get("type")
        if types is None:
            implied = list(dict.fromkeys(t for k, t in _IMPLIED_TYPE.items() if k in schema))
            return implied or list(TYPES)
        types = [types] if isinstance(types, str) else list(types)
        for t in types:
            if t not in TYPES:
                raise GrammarError(f"type {t!r} is not supported (at {where})")
        if "integer" in types and "number" in types:
            types.remove("integer")
        return types

    def _typed(self, type_name: str, schema: dict[str, Any], where: str) -> str:
        if type_name == "object":
            return self._object(schema, where)
        if type_name == "array":
            return self._array(schema, where)
        if type_name == "string":
            min_length, max_length = schema.get("minLength", 0), schema.get("maxLength")
            if max_length is not None and min_length > max_length:
                raise GrammarError(f"minLength is above maxLength (at {where})")
            if min_length == 0 and max_length is None:
                return self.text.free_string()
            return self.text.bounded_string(min_length, max_length)
        if type_name in ("integer", "number"):
            bounds = {k: schema[k] for k in _NUMBER_BOUNDS if k in schema}
            if bounds:
                try:
                    return self.text.bounded_number({"type": type_name, **bounds})
                except RuntimeError:
                    raise GrammarError(f"no {type_name} satisfies the bounds at {where}") from None
            return self.text.integer() if type_name == "integer" else self.text.number()
        return '("true" | "false")' if type_name == "boolean" else '"null"'

    def _literals(self, schema: dict[str, Any], where: str) -> str:
        values = [schema["const"]] if "const" in schema else list(schema["enum"])
        siblings = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values if _fits(siblings, v)]
        kept = [t for t in texts if not any(x in t for x in self.text.excluded_text)]
        if not kept:
            raise GrammarError(f"no enum/const value at {where} fits its schema without a reserved marker")
        return self._rule(" | ".join(literal(t) for t in kept))

    def _ref(self, ref: str, where: str) -> str:
        if ref in self._refs:
            return self._refs[ref]
        if not ref.startswith("#"):
            raise GrammarError(f"only local $ref is supported, got {ref!r} (at {where})")
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise GrammarError(f"$ref {ref!r} points nowhere (at {where})")
            target = target[part]
        name = self._refs[ref] = f"r{len(self.rules)}"
        self.rules[name] = '""'  # reserved now: a recursive schema refers to it before it is built
        self.rules[name] = self.value(target, ref)
        return name

    def _any(self) -> str:
        if "any" not in self.rules:
            self.rules["any"] = '""'
            self.rules["any"] = " | ".join([self._free_object(None, "#any"), self._array({}, "#any"),
                                           self.text.free_string(), self.text.number(), '"true" | "false" | "null"'])
        return "any"

    def _object(self, schema: dict[str, Any], where: str) -> str:
        properties = schema.get("properties") or {}
        required = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        if not properties and not required:
            return self._free_object(None if extra is True else extra, where)
        missing = [name for name in required if name not in properties]
        if missing and extra is False:
            raise GrammarError(f"required property {missing[0]!r} is not allowed (at {where})")
        members = [(n, s) for n, s in properties.items() if s is not False or n in required]
        members += [(n, True if extra is True else extra) for n in missing]
        ws = self.text.whitespace()
        # After_i: the members from i on, each (but the first present) after a comma; built from the end.
        first, after = '""', '""'
        for i in reversed(range(len(members))):
            name, member_schema = members[i]
            if any(x in name for x in self.text.excluded_text):
                raise GrammarError(f"property name {name!r} holds a reserved marker (at {where})")
            pair = f"{literal(json.dumps(name, ensure_ascii=False))} {ws} \":\" {ws} " \
                   f"{self.value(member_schema, f'{where}/properties/{name}')}"
            is_required = name in required
            tail = self._rule(f'{ws} "," {ws} {pair} {after}' + ("" if is_required else f" | {after}"))
            first = self._rule(f"{pair} {after}" + ("" if is_required else f" | {first}"))
            after = tail
        return self._rule(f'"{{" {ws} {first} {ws} "}}"')

    def _free_object(self, values: dict[str, Any] | bool | None, where: str) -> str:
        """An object with any property names (none of them holding excluded text)."""
        ws = self.text.whitespace()
        if values is False:
            return self._rule(f'"{{" {ws} "}}"')
        value = self._any() if values is None or values is True else self.value(values, f"{where}/additionalProperties")
        pair = f'{self.text.free_string()} {ws} ":" {ws} {value}'
        return self._rule(f'"{{" {ws} "}}" | "{{" {ws} {pair} {self._tail(pair, None, 0)} {ws} "}}"')

    def _array(self, schema: dict[str, Any], where: str) -> str:
        min_items, max_items = schema.get("minItems", 0), schema.get("maxItems")
        items = schema.get("items", True)
        ws = self.text.whitespace()
        empty = f'"[" {ws} "]"'
        if items is False or max_items == 0:
            if min_items > 0:
                raise GrammarError(f"the array at {where} can hold no item but needs {min_items}")
            return self._rule(empty)
        if max_items is not None and min_items > max_items:
            raise GrammarError(f"minItems is above maxItems (at {where})")
        item = self.value(items, f"{where}/items")
        more = self._tail(item, None if max_items is None else max_items - 1, max(min_items - 1, 0))
        full = f'"[" {ws} {item} {more} {ws} "]"'
        return self._rule(full if min_items > 0 else f"{empty} | {full}")

    def _tail(self, element: str, num_left: int | None, num_needed: int) -> str:
        """`("," element)` repeated num_needed..num_left times (None: no upper bound) as right recursion,
        one rule per count: xgrammar masks a `{m,n}` or `*` of a rule far slower."""
        key = (element, num_left, num_needed)
        if key in self._tails:
            return self._tails[key]
        name = self._tails[key] = self._rule('""')
        ws = self.text.whitespace()
        arms = ['""'] if num_needed == 0 else []
        if num_left is None or num_left > 0:
            rest = self._tail(element, None if num_left is None else num_left - 1, max(num_needed - 1, 0))
            arms.append(f'{ws} "," {ws} {element} {rest}')
        self.rules[name] = " | ".join(arms)
        return name


def _fits(schema: dict[str, Any], value: Any) -> bool:
    """Whether an enum/const value also meets its sibling keywords (a $ref there is left to the value)."""
    try:
        return Draft202012Validator(schema).is_valid(value)
    except Unresolvable:
        return True
