"""Grammar-constrained decoding (response_format json_object / json_schema) on the embedded k2-tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import track_engine

from k2ray import LLM, SamplingParams
from k2ray.engine.scheduler import RequestRejected
from k2ray.engine.structured.structured_output import RequestGrammar, apply_grammar_bitmask
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import StructuredOutputParams

PROMPT = "Reply in JSON"
JSON_OBJECT = StructuredOutputParams(json_object=True)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}
# Bounded: greedy decoding reaches its end (an integer's digits could go on until max_tokens).
BOOL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
               "additionalProperties": False}
NUM_SEEDS = 6
MAX_TOKENS = 128


def _sampled(structured: StructuredOutputParams, max_tokens: int = MAX_TOKENS) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_output=structured)
            for seed in range(NUM_SEEDS)]


def _stopped_texts(outputs) -> list[str]:
    completions = [o.outputs[0] for o in outputs]
    assert all(c.finish_reason in ("stop", "length") for c in completions)
    return [c.text for c in completions if c.finish_reason == "stop"]


def test_json_object_outputs_parse_to_dicts(llm: LLM) -> None:
    texts = _stopped_texts(llm.generate([PROMPT] * NUM_SEEDS, _sampled(JSON_OBJECT)))
    assert texts, "no output finished by stop"
    assert all(isinstance(json.loads(text), dict) for text in texts)


def test_json_schema_outputs_validate(llm: LLM) -> None:
    outputs = llm.generate([PROMPT] * NUM_SEEDS, _sampled(StructuredOutputParams(json_schema=SCHEMA)))
    texts = _stopped_texts(outputs)
    assert len(texts) == NUM_SEEDS
    for text in texts:
        value = json.loads(text)
        assert list(value) == ["a"] and isinstance(value["a"], int)


def test_unconstrained_rows_are_untouched_in_a_mixed_batch(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=24)
    prompts = [PROMPT, "Once upon a time", "Hello there"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    constrained = replace(greedy, structured_output=JSON_OBJECT)
    mixed = llm.generate(prompts * 2, [greedy, constrained, greedy, constrained, greedy, constrained])
    tokens = [o.outputs[0].token_ids for o in mixed]
    assert [tokens[0], tokens[2], tokens[4]] == [alone[0], alone[2], alone[1]]
    assert tokens[1] != alone[1]  # the constraint did act on the constrained rows
    assert mixed[1].outputs[0].text.startswith("{")


def test_enforcement_starts_after_the_trigger_token(llm: LLM) -> None:
    # A trigger the unconstrained greedy run samples first at position k: the constrained run must
    # match it up to and including k (nothing masked yet), and be JSON from k + 1 on.
    greedy = SamplingParams(temperature=0, max_tokens=32, skip_special_tokens=False)
    free = llm.generate(PROMPT, greedy)[0].outputs[0].token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    structured = StructuredOutputParams(json_object=True, enforce_after_token_id=free[k])
    out = llm.generate(PROMPT, replace(greedy, max_tokens=96, structured_output=structured))[0].outputs[0]
    assert out.token_ids[:k + 1] == free[:k + 1]
    assert out.token_ids[k + 1:] != free[k + 1:]
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode([out.token_ids[k + 1]]).startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(tokenizer.decode(out.token_ids[k + 1:], skip_special_tokens=True)), dict)


def test_think_end_trigger_leaves_reasoning_free(llm: LLM) -> None:
    # The random model never closes its reasoning, so with `</think>` as the trigger nothing is masked.
    think_end = llm.get_tokenizer().token_id("</think>")
    greedy = SamplingParams(temperature=0, max_tokens=16)
    structured = StructuredOutputParams(json_object=True, enforce_after_token_id=think_end)
    free = llm.generate(PROMPT, greedy)[0].outputs[0].token_ids
    assert think_end not in free
    assert llm.generate(PROMPT, replace(greedy, structured_output=structured))[0].outputs[0].token_ids == free


def test_preemption_keeps_the_grammar_in_step() -> None:
    params = _sampled(JSON_OBJECT, max_tokens=96)
    reference = LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=512, max_num_batched_tokens=256,
                    max_model_len=512)
    expected = [o.outputs[0].token_ids for o in reference.generate([PROMPT] * NUM_SEEDS, params)]
    tight = LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=28, max_num_batched_tokens=32,
                max_model_len=512, enable_prefix_caching=False)
    track_engine(tight)
    outputs = tight.generate([PROMPT] * NUM_SEEDS, params)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(isinstance(json.loads(text), dict) for text in _stopped_texts(outputs))
    tight.llm_engine.step()  # finished requests reach the runner with the next step
    assert not tight.llm_engine.model_runner.requests  # ... which drops them, matchers included


def test_engine_without_tokenizer_reads_the_vocabulary_from_the_checkpoint(llm: LLM) -> None:
    ids_only = LLM(tiny_checkpoint_dir(), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    track_engine(ids_only)
    params = SamplingParams(temperature=0, max_tokens=32,
                            structured_output=StructuredOutputParams(json_schema=BOOL_SCHEMA))
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode(PROMPT)}
    out = ids_only.generate(prompt, params)[0].outputs[0]
    assert out.token_ids == llm.generate(prompt, params)[0].outputs[0].token_ids
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True))["ok"], bool)


def test_finished_grammar_stops_even_under_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                            structured_output=StructuredOutputParams(json_schema=BOOL_SCHEMA))
    out = llm.generate(PROMPT, params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < params.max_tokens
    assert isinstance(json.loads(out.text)["ok"], bool)


def test_invalid_schema_is_rejected(llm: LLM) -> None:
    bad = StructuredOutputParams(json_schema={"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(RequestRejected, match="JSON schema"):
        llm.generate(PROMPT, SamplingParams(structured_output=bad))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(json_object=True, json_schema=SCHEMA)


def test_bitmask_touches_only_active_rows(llm: LLM) -> None:
    manager = llm.llm_engine.structured_output
    active = manager.new_grammar(manager.submit(JSON_OBJECT).result(), JSON_OBJECT, [])
    waiting = RequestGrammar(active.matcher, enforce_after_token_id=0)
    logits = torch.zeros(3, manager.vocab_size)
    apply_grammar_bitmask(logits, [None, active, waiting])
    assert torch.equal(logits[0], torch.zeros(manager.vocab_size))
    assert torch.equal(logits[2], torch.zeros(manager.vocab_size))
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    tokenizer = llm.get_tokenizer()
    assert allowed and all(tokenizer.token_bytes(i).startswith(b"{") for i in allowed)
