"""Grammars compile off the step loop: a constrained request waits, unscheduled, while others step on;
the compiler is built when the engine starts; a schema that cannot compile fails only its request."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest

from k2ray.engine.config import EngineConfig
from k2ray.engine.errors import EngineStepError
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.scheduler import RequestRejected
from k2ray.engine.structured.structured_output import GrammarError
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams, StructuredOutputParams

BOOL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
               "additionalProperties": False}
CONSTRAINED = SamplingParams(temperature=0, max_tokens=32,
                             structured_output=StructuredOutputParams(json_schema=BOOL_SCHEMA))
FREE = SamplingParams(temperature=0, max_tokens=6)
# Bounds a test that would otherwise hang if the gate were never opened.
GATE_TIMEOUT_S = 60.0


class GatedExecutor(Executor):
    """Runs each task on a worker thread only once the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.num_submitted = 0
        self._pool = ThreadPoolExecutor(1)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.num_submitted += 1
        return self._pool.submit(self._run, fn, args, kwargs)

    def _run(self, fn, args, kwargs):
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        return fn(*args, **kwargs)

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.gate.set()
        self._pool.shutdown(wait)


def make_engine(track_kv, executor: Executor | None = None, **overrides) -> LLMEngine:
    config = EngineConfig(model=str(tiny_checkpoint_dir()), block_size=4, num_kv_blocks=128, max_model_len=256,
                          **overrides)
    engine = LLMEngine(config, grammar_executor=executor)
    track_kv(engine.kv_cache_manager)
    return engine


def test_requests_step_on_while_a_grammar_compiles(track_kv) -> None:
    executor = GatedExecutor()
    engine = make_engine(track_kv, executor)
    tokenizer = engine.tokenizer
    engine.add_request("constrained", tokenizer.encode("Reply in JSON"), CONSTRAINED)
    engine.add_request("free_a", tokenizer.encode("Once upon a time"), FREE)
    engine.add_request("free_b", tokenizer.encode("Hello there"), FREE)
    assert executor.num_submitted == 1
    finished = {}
    while len(finished) < 2:
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert sorted(finished) == ["free_a", "free_b"]
    assert all(len(o.outputs[0].token_ids) == FREE.max_tokens for o in finished.values())
    waiting = engine.scheduler.requests["constrained"]
    assert waiting.num_computed_tokens == 0 and waiting.num_output_tokens == 0
    assert engine.kv_cache_manager.get_block_ids("constrained") == []

    executor.gate.set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    out = finished["constrained"].outputs[0]
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.text)["ok"], bool)
    executor.shutdown()


def test_one_compilation_serves_every_request_with_the_schema(track_kv) -> None:
    executor = GatedExecutor()
    engine = make_engine(track_kv, executor)
    prompt = engine.tokenizer.encode("Reply in JSON")
    engine.add_request("first", prompt, CONSTRAINED)
    engine.add_request("second", prompt, CONSTRAINED)
    executor.gate.set()
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert executor.num_submitted == 1
    assert finished["first"].outputs[0].token_ids == finished["second"].outputs[0].token_ids
    engine.add_request("cached", prompt, CONSTRAINED)  # compiled already: no new task
    while engine.has_unfinished_requests():
        engine.step()
    assert executor.num_submitted == 1
    executor.shutdown()


def test_invalid_schema_is_rejected_with_a_clean_message(track_kv) -> None:
    engine = make_engine(track_kv)
    bad = StructuredOutputParams(json_schema={"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(RequestRejected) as rejected:
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_output=bad))
    message = str(rejected.value)
    assert message == "unsupported JSON schema: type 'no-such-type' is not supported (at #/properties/a)"
    assert not engine.has_unfinished_requests()
    engine.add_request("good", [1, 2, 3], FREE)  # the engine serves on
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()


def test_compiler_is_built_at_start_only_when_enabled(track_kv) -> None:
    enabled = make_engine(track_kv)
    assert enabled.structured_output is not None  # vocabulary and compiler ready before any request
    enabled.shutdown()
    disabled = make_engine(track_kv, enable_structured_output=False)
    assert disabled.structured_output is None
    with pytest.raises(RequestRejected, match="structured output is disabled"):
        disabled.add_request("c", [1, 2, 3], CONSTRAINED)


class FailingExecutor(Executor):
    """Every compilation fails, as one the schema check let through but xgrammar then refused."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_exception(GrammarError("invalid JSON schema: refused"))
        return future


def test_a_failed_compilation_fails_only_its_request(track_kv) -> None:
    engine = make_engine(track_kv, FailingExecutor())
    engine.add_request("constrained", [1, 2, 3], CONSTRAINED)
    engine.add_request("free", [4, 5, 6], FREE)
    with pytest.raises(RequestRejected) as failure:  # as at add_request, so serving answers it with a 400
        engine.step()
    assert isinstance(failure.value, EngineStepError) and failure.value.request_ids == ["constrained"]
    assert str(failure.value) == "invalid JSON schema: refused"
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert list(finished) == ["free"] and len(finished["free"].outputs[0].token_ids) == FREE.max_tokens
