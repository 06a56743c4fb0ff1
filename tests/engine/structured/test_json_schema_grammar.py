"""JSON Schema -> EBNF: every sentence of the grammar validates and holds no marker, shown by random walks.

A walk samples uniformly among the tokens the grammar allows next, over a vocabulary built to tempt it:
single characters (quote, backslash, `<`, `|`, control characters), whole marker texts and their
fragments, escapes, multibyte characters. Each finished walk must parse (strict JSON), validate
(jsonschema) and hold none of K2's markers; the walks must also reach the edges (longest and shortest
strings, fullest arrays, marker fragments inside free strings), so a pass is not for want of trying.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
import xgrammar as xgr

from k2ray.api.output_parser import ALL_MARKERS
from k2ray.engine.structured.json_schema_grammar import GrammarError, json_schema_ebnf
from k2ray.engine.structured.json_text_grammar import MAX_CHAINED_LENGTH

NODE = {"type": "object", "additionalProperties": False,
        "properties": {"v": {"type": "boolean"}, "next": {"$ref": "#/$defs/node"}}}
AGENT = {"type": "object", "additionalProperties": False, "required": ["path", "lines", "mode", "meta", "body"],
         "$defs": {"node": NODE}, "properties": {
             "path": {"type": "string", "minLength": 2, "maxLength": 4},
             "body": {"type": "string"},
             "lines": {"type": "array", "minItems": 1, "maxItems": 3,
                       "items": {"type": "integer", "minimum": -5, "maximum": 12}},
             "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5},
             "mode": {"enum": ["r", "w", 1, None, "<|tool_call_end|>"]},
             "meta": {"type": "object"},
             "tag": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]},
             "note": {"type": ["string", "null"], "minLength": 3},
             "node": {"$ref": "#/$defs/node"}}}
FLAT = {"type": "object", "additionalProperties": False, "required": ["id", "n"],
        "properties": {"id": {"type": "string", "maxLength": 3}, "n": {"type": "integer", "minimum": 1, "maximum": 9},
                       "kind": {"const": "x"}, "ok": {"type": "boolean"}}}
PIECES = ([chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\x01", "é", "😀", "\\u003c", "\\ud83d", "\\n"]
          + list(ALL_MARKERS) + ["<|", "|>", "<|tool_call", "_end|>", "</think", "<think", "k>"]
          + ['"a"', '":', '","', "true", "null", "12", "-0", "2.5", "abcdefgh", '{"', "[1"])
STOP_ID = len(PIECES)
NUM_WALKS = 150
MAX_STEPS = 400
STOP_SHARE = 0.3  # when the grammar may end, a walk ends with this chance (else runs on)


@pytest.fixture(scope="module")
def compiler() -> xgr.GrammarCompiler:
    vocab = [piece.encode() for piece in PIECES] + [b""]
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab),
                                                 stop_token_ids=[STOP_ID]), cache_enabled=False)


def _walks(compiler: xgr.GrammarCompiler, schema: dict, seed: int) -> list[str]:
    compiled = compiler.compile_grammar(xgr.Grammar.from_ebnf(json_schema_ebnf(schema, ALL_MARKERS, 1)))
    rng = random.Random(seed)
    bitmask = xgr.allocate_token_bitmask(1, STOP_ID + 1)
    bits = torch.arange(STOP_ID + 1)
    texts = []
    for _ in range(NUM_WALKS):
        matcher, pieces = xgr.GrammarMatcher(compiled), []
        for _ in range(MAX_STEPS):
            matcher.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0, bits // 32] >> (bits % 32)) & 1).nonzero().flatten().tolist()
            token_id = STOP_ID if STOP_ID in allowed and rng.random() < STOP_SHARE else rng.choice(allowed)
            assert matcher.accept_token(token_id)
            if token_id == STOP_ID:
                texts.append("".join(pieces))
                break
            pieces.append(PIECES[token_id])
    assert len(texts) >= NUM_WALKS // 2  # most walks end within MAX_STEPS
    return texts


def _checked(texts: list[str], schema: dict) -> list:
    values = []
    for text in texts:
        assert not any(marker in text for marker in ALL_MARKERS), text
        value = json.loads(text)  # strict: no raw control characters in strings
        jsonschema.validate(value, schema)
        values.append(value)
    return values


def test_agent_schema_walks_validate_and_reach_the_edges(compiler: xgr.GrammarCompiler) -> None:
    values = _checked(_walks(compiler, AGENT, seed=0), AGENT)
    assert {len(v["path"]) for v in values} >= {2, 4}
    assert {len(v["lines"]) for v in values} == {1, 2, 3}
    assert {-5, 12} & {n for v in values for n in v["lines"]}
    assert any("<" in v["path"] for v in values)  # written as an escape: still one code point
    bodies = [v["body"] for v in values]
    assert any("<|" in b for b in bodies) and any("</think" in b for b in bodies)  # fragments pass, markers do not
    assert {json.dumps(v["mode"]) for v in values} == {'"r"', '"w"', "1", "null"}
    assert any(v["meta"] for v in values) and any("node" in v for v in values)
    assert any(isinstance(v.get("ratio"), float) for v in values)


def test_flat_schema_walks_validate(compiler: xgr.GrammarCompiler) -> None:
    values = _checked(_walks(compiler, FLAT, seed=1), FLAT)
    assert {len(v["id"]) for v in values} == {0, 1, 2, 3} and {v["n"] for v in values} <= set(range(1, 10))
    assert any("kind" in v for v in values) and any("ok" in v for v in values)


def test_long_bounds_count_plain_characters(compiler: xgr.GrammarCompiler) -> None:
    long = {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
        "a": {"type": "string", "minLength": MAX_CHAINED_LENGTH + 2, "maxLength": MAX_CHAINED_LENGTH + 4},
        "b": {"type": "string", "minLength": MAX_CHAINED_LENGTH + 1}}}
    values = _checked(_walks(compiler, long, seed=3), long)
    assert any(len(v["a"]) == MAX_CHAINED_LENGTH + 4 for v in values)


def test_free_object_keys_and_values_hold_no_marker(compiler: xgr.GrammarCompiler) -> None:
    values = _checked(_walks(compiler, {"type": "object"}, seed=2), {"type": "object"})
    assert any(len(v) >= 2 for v in values)


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "string", "pattern": "^a$"}, "keyword 'pattern' is not supported (at #)"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}},
     "keyword 'oneOf' is not supported (at #/properties/a)"),
    ({"type": "array", "uniqueItems": True}, "keyword 'uniqueItems'"),
    ({"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "type 'no-such-type' is not supported"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength is above maxLength"),
    ({"type": "array", "minItems": 2, "maxItems": 1}, "minItems is above maxItems"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer satisfies the bounds"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"$ref": "https://example.com/s.json"}, "only local $ref"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, "'anyOf' beside 'type'"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required property 'a' is not allowed"),
    ({"enum": ["<|tool_call_end|>"]}, "without a reserved marker"),
])
def test_unenforceable_schemas_are_refused_by_name(schema: dict, message: str) -> None:
    with pytest.raises(GrammarError, match=message.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        json_schema_ebnf(schema, ALL_MARKERS, 1)
