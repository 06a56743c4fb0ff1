"""Tool calls and JSON output valid by construction, on the embedded random k2-tiny model.

A random model is the adversary: about a third of its vocabulary is special tokens, so unconstrained
it opens sections, calls undeclared names and stops mid-reasoning all the time. Under the grammar,
every call it makes must have a declared name, the right running index and arguments that validate.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from k2ray import LLM, SamplingParams
from k2ray.api.output_parser import CALL_END, SECTION_BEGINS, THINK_END, parse_k2_output
from k2ray.engine.structured.structured_output import apply_grammar_bitmask
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import StructuredOutputParams, ToolCallParams, ToolFunction

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                          "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["q"],
          "properties": {"q": {"type": "boolean"},
                         "filters": {"type": "array", "maxItems": 2, "items": {
                             "type": "object", "required": ["k"], "additionalProperties": False,
                             "properties": {"k": {"type": "boolean"}}}}}}
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
FUNCTIONS = tuple(ToolFunction(name, schema) for name, schema in SCHEMAS.items())
ANSWER = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}}
# The response_format check's schema: the length, item and numeric bounds xgrammar's own converter lost.
REPORT = {"type": "object", "additionalProperties": False, "required": ["ok", "name", "n"],
          "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "minLength": 1, "maxLength": 6},
                         "n": {"type": "integer", "minimum": 1, "maximum": 3},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}
PROMPT = "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>"
INDEX_START = 3
NUM_SEEDS = 32
NUM_JSON_SEEDS = 50
MAX_TOKENS = 128
MAX_JSON_TOKENS = 48
MAX_REPORT_TOKENS = 112  # REPORT's string and optional array take a random model more tokens to close
REASONING_BUDGET = 16
RAW_CALL_ID = re.compile(r"<\|tool_call_begin\|>([^<]*)<\|tool_call_argument_begin\|>")


@pytest.fixture(scope="module")
def shared_llm() -> LLM:
    return LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=4096, max_num_batched_tokens=1024, max_num_seqs=64,
               max_model_len=512)


def _generate(llm: LLM, structured: StructuredOutputParams, num_seeds: int = NUM_SEEDS,
              max_tokens: int = MAX_TOKENS):
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, skip_special_tokens=False,
                             structured_output=structured) for seed in range(num_seeds)]
    return [o.outputs[0] for o in llm.generate([PROMPT] * num_seeds, params)]


def _tools(mode: str, forced: str | None = None, is_parallel: bool = True) -> StructuredOutputParams:
    return StructuredOutputParams(tool_calls=ToolCallParams(FUNCTIONS, mode, forced, is_parallel, INDEX_START),
                                  reasoning=True, max_reasoning_tokens=REASONING_BUDGET)


def _checked_calls(output) -> list[tuple[str, dict]]:
    """The output's complete calls, each checked: declared name, running index, schema-valid arguments
    (a call cut by max_tokens is left out)."""
    text = output.text
    raw_ids = RAW_CALL_ID.findall(text)
    calls = parse_k2_output(text, thinking=True, tools_enabled=True, tool_call_id_offset=INDEX_START).tool_calls
    num_complete = text.count(CALL_END)
    assert num_complete == len(calls) or (output.finish_reason == "length" and num_complete == len(calls) - 1)
    ids = [f"functions.{c.name}:{INDEX_START + i}" for i, c in enumerate(calls)]
    assert [c.id for c in calls] == ids and raw_ids[:num_complete] == ids[:num_complete]
    checked = []
    for call in calls[:num_complete]:
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.name])
        checked.append((call.name, arguments))
    return checked


def _finished(outputs, min_share: float = 0.5) -> list:
    """The outputs that ended with a stop token: at least `min_share` of them (free text in auto mode
    runs on to max_tokens: a random model rarely samples the stop token)."""
    stopped = [c for c in outputs if c.finish_reason == "stop"]
    assert all(c.finish_reason in ("stop", "length") for c in outputs)
    assert stopped and len(stopped) >= min_share * len(outputs), [c.finish_reason for c in outputs]
    return stopped


@pytest.mark.parametrize(("mode", "forced"), [("auto", None), ("required", None), ("named", "search")])
def test_every_call_is_declared_indexed_and_schema_valid(llm: LLM, mode: str, forced: str | None) -> None:
    outputs = _generate(llm, _tools(mode, forced))
    num_calls = [len(_checked_calls(c)) for c in outputs]
    num_stopped_calls = [len(_checked_calls(c)) for c in _finished(outputs, 0.0 if mode == "auto" else 0.25)]
    if mode == "auto":
        assert 0 in num_stopped_calls and max(num_calls) >= 1  # both text and calls
    elif mode == "required":
        assert min(num_stopped_calls) >= 1 and max(num_calls) >= 2  # parallel calls happen, each indexed
    else:
        assert num_stopped_calls == [1] * len(num_stopped_calls) and max(num_calls) == 1
        assert all(name == "search" for c in outputs for name, _ in _checked_calls(c))


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_parallel_off_allows_one_call(llm: LLM, mode: str) -> None:
    outputs = _generate(llm, _tools(mode, is_parallel=False))
    num_stopped_calls = [len(_checked_calls(c)) for c in _finished(outputs, 0.0 if mode == "auto" else 0.25)]
    assert max(len(_checked_calls(c)) for c in outputs) == 1
    assert mode == "auto" or min(num_stopped_calls) == 1


def test_tool_choice_none_never_opens_a_section(llm: LLM) -> None:
    outputs = _generate(llm, _tools("none"))
    assert all(SECTION_BEGINS[0] not in c.text and "<|tool_call_begin|>" not in c.text for c in outputs)
    assert all(THINK_END in c.text for c in _finished(outputs, 0.0))


def test_reasoning_ends_only_through_think_end_within_its_budget(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    for c in _generate(llm, _tools("required")):
        assert THINK_END in c.text and SECTION_BEGINS[0] not in c.text.split(THINK_END)[0]
        num_reasoning = next(n for n in range(len(c.token_ids) + 1)
                             if THINK_END in tokenizer.decode(c.token_ids[:n]))
        # Forced once the budget is spent; a marker half spelled in pieces may have to finish first.
        assert num_reasoning <= REASONING_BUDGET + len(THINK_END)


def test_output_budget_spent_in_reasoning_ends_with_length(llm: LLM) -> None:
    # No reasoning budget and a tiny output budget: the reasoning cannot stop, nor leave but by `</think>`.
    structured = StructuredOutputParams(json_schema=ANSWER, reasoning=True)
    outputs = _generate(llm, structured, max_tokens=6)
    for c in outputs:
        assert c.finish_reason == "length" or THINK_END in c.text
    assert all(c.finish_reason == "length" for c in outputs if THINK_END not in c.text)


@pytest.mark.parametrize("thinking", [True, False])
def test_json_schema_outputs_that_stop_validate(llm: LLM, thinking: bool) -> None:
    structured = StructuredOutputParams(json_schema=REPORT, reasoning=thinking,
                                        max_reasoning_tokens=REASONING_BUDGET if thinking else None)
    outputs = _generate(llm, structured, NUM_JSON_SEEDS, MAX_REPORT_TOKENS)
    stopped = _finished(outputs)
    names = set()
    for c in stopped:
        parsed = parse_k2_output(c.text, thinking=thinking, tools_enabled=False)
        value = json.loads(parsed.content_text)
        jsonschema.validate(value, REPORT)
        names.add(len(value["name"]))
        assert thinking == (THINK_END in c.text)
    assert REPORT["properties"]["name"]["maxLength"] in names  # the walk reaches the bound it must keep


def test_json_content_or_a_call_in_auto_mode(llm: LLM) -> None:
    structured = StructuredOutputParams(json_schema=ANSWER, tool_calls=ToolCallParams(FUNCTIONS, "auto",
                                        call_index_start=INDEX_START), reasoning=True,
                                        max_reasoning_tokens=REASONING_BUDGET)
    kinds = set()
    for c in _finished(_generate(llm, structured), 0.0):
        parsed = parse_k2_output(c.text, thinking=True, tools_enabled=True, tool_call_id_offset=INDEX_START)
        if _checked_calls(c):
            kinds.add("call")
            assert parsed.content_text == ""
        else:
            kinds.add("json")
            jsonschema.validate(json.loads(parsed.content_text), ANSWER)
    assert kinds == {"call", "json"}


def test_grammar_masks_other_specials_and_markers_inside_arguments(llm: LLM) -> None:
    manager = llm.llm_engine.structured_output
    tokenizer = llm.get_tokenizer()
    params = _tools("named", "search")
    grammar = manager.new_grammar(manager.submit(params).result(), params, [])
    matcher = grammar.matcher
    assert matcher.accept_string(f"<think>r{THINK_END}{SECTION_BEGINS[0]}<|tool_call_begin|>")
    assert not matcher.accept_string("functions.get_weather")  # not the forced function
    assert matcher.accept_string(f"functions.search:{INDEX_START}<|tool_call_argument_begin|>")
    # Marker text inside an argument string would derail the parser: excluded.
    assert not matcher.accept_string('{"q": "<|tool_call_end|>')
    hidden = [i for name, i in tokenizer.special_token_ids.items() if "reserved" in name or "media" in name]
    logits = torch.zeros(1, manager.vocab_size)
    apply_grammar_bitmask(logits, [grammar])
    assert hidden and not torch.isfinite(logits[0, hidden]).any()
    assert torch.isfinite(logits[0]).any()


def test_spent_reasoning_budget_leaves_only_think_end(llm: LLM) -> None:
    manager = llm.llm_engine.structured_output
    tokenizer = llm.get_tokenizer()
    params = StructuredOutputParams(json_object=True, reasoning=True, max_reasoning_tokens=2)
    compiled = manager.submit(params).result()
    word = tokenizer.encode("hello", allow_special_tokens=False)
    for num_reasoning in (1, 2):
        grammar = manager.new_grammar(compiled, params, word[:1] * num_reasoning)
        logits = torch.zeros(1, manager.vocab_size)
        apply_grammar_bitmask(logits, [grammar])
        allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
        if num_reasoning < 2:
            assert len(allowed) > 1
        else:
            assert allowed == [tokenizer.token_id(THINK_END)]
    bitmask = xgr.allocate_token_bitmask(1, manager.vocab_size)
    grammar.matcher.fill_next_token_bitmask(bitmask, 0)  # the grammar itself still allows free text
    assert int((bitmask != 0).sum()) > 1


def test_tool_call_params_are_checked() -> None:
    with pytest.raises(ValueError, match="not declared"):
        ToolCallParams(FUNCTIONS, "named", "nope")
    with pytest.raises(ValueError, match="distinct"):
        ToolCallParams(FUNCTIONS * 2)
    with pytest.raises(ValueError, match="at least one"):
        ToolCallParams((), "required")
    with pytest.raises(ValueError, match="exclusive"):
        StructuredOutputParams(json_object=True, reasoning=True, enforce_after_token_id=1)
    assert ToolCallParams(FUNCTIONS, is_parallel=False).num_call_positions == 1
    assert not ToolCallParams(FUNCTIONS, "none").callable_functions


def test_arguments_without_a_type_are_still_an_object(llm: LLM) -> None:
    manager = llm.llm_engine.structured_output
    loose = ToolCallParams((ToolFunction("f", {"properties": {"a": {"type": "boolean"}}}),), "named", "f")
    params = StructuredOutputParams(tool_calls=loose)
    matcher = manager.new_grammar(manager.submit(params).result(), params, []).matcher
    head = f"{SECTION_BEGINS[0]}<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
    assert matcher.accept_string(head) and not matcher.accept_string("[")
