from __future__ import annotations

import asyncio

import pytest
from conftest import track_engine

from k2ray.engine.async_engine import AsyncLLMEngine, EngineError, RequestRejected
from k2ray.engine.config import EngineConfig
from k2ray.engine.llm import LLM
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.sampling_params import SamplingParams

NUM_BLOCKS = 128
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def shared_engine():
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), block_size=4,
                                         num_kv_blocks=NUM_BLOCKS, max_model_len=256))
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(shared_engine: AsyncLLMEngine) -> AsyncLLMEngine:
    track_engine(shared_engine)
    return shared_engine


async def collect(engine: AsyncLLMEngine, request_id: str, prompt: list[int], params: SamplingParams):
    return [out async for out in engine.add_request(request_id, prompt, params)]


async def wait_until_idle(engine: AsyncLLMEngine) -> None:
    for _ in range(200):
        stats = engine.get_stats()
        if stats.num_running == stats.num_waiting == 0:
            return
        await asyncio.sleep(0.01)


async def test_streams_deltas_that_add_up_to_the_offline_result(engine: AsyncLLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    deltas = await collect(engine, "stream", PROMPT, params)
    assert len(deltas) == 12 and [d.finished for d in deltas] == [False] * 11 + [True]
    assert all(len(d.outputs[0].token_ids) == 1 and len(d.outputs[0].logprobs) == 1 for d in deltas)
    assert deltas[-1].outputs[0].finish_reason == "length"
    tokens = [t for d in deltas for t in d.outputs[0].token_ids]
    text = "".join(d.outputs[0].text for d in deltas)
    offline = LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=NUM_BLOCKS)
    track_engine(offline)
    expected = offline.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=12))[0]
    assert tokens == expected.outputs[0].token_ids
    assert text == expected.outputs[0].text


async def test_a_lagging_consumer_gets_what_piled_up_as_one_delta(engine: AsyncLLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    reference = await collect(engine, "fast", PROMPT, params)
    stream = engine.add_request("slow", PROMPT, params)
    first = await stream.__anext__()
    await wait_until_idle(engine)  # the later steps' outputs are (all but maybe the last) waiting here
    rest = [out async for out in stream]
    assert len(rest) <= 2 and rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"
    tokens = [t for d in [first, *rest] for t in d.outputs[0].token_ids]
    assert tokens == [t for d in reference for t in d.outputs[0].token_ids]
    assert "".join(d.outputs[0].text for d in [first, *rest]) == "".join(d.outputs[0].text for d in reference)
    assert sum(len(d.outputs[0].logprobs) for d in rest) == len(tokens) - 1 == 11


async def test_concurrent_requests_and_cached_tokens(engine: AsyncLLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=8)
    results = await asyncio.gather(*(collect(engine, f"c{i}", PROMPT + [i], params) for i in range(6)))
    assert all(r[-1].finished and sum(len(d.outputs[0].token_ids) for d in r) == 8 for r in results)
    again = await collect(engine, "again", PROMPT + [0], params)
    assert all(d.num_cached_tokens == 40 for d in again)
    assert [t for d in again for t in d.outputs[0].token_ids] == \
        [t for d in results[0] for t in d.outputs[0].token_ids]
    stats = engine.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits


async def test_abort_frees_blocks_at_once(engine: AsyncLLMEngine) -> None:
    stream = engine.add_request("long", PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    first = await stream.__anext__()
    assert not first.finished
    assert engine.get_stats().num_free_blocks < NUM_BLOCKS
    await engine.abort("long")
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks == NUM_BLOCKS
    rest = [out async for out in stream]
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"


async def test_consumer_leaving_frees_blocks(engine: AsyncLLMEngine) -> None:
    stream = engine.add_request("leaver", PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    await stream.__anext__()
    await stream.aclose()
    await wait_until_idle(engine)
    assert engine.get_stats().num_free_blocks == NUM_BLOCKS


async def test_rejected_request_raises_from_the_iterator(engine: AsyncLLMEngine) -> None:
    with pytest.raises(RequestRejected):
        await collect(engine, "too-long", list(range(300)), SamplingParams(max_tokens=10))


async def test_step_failure_fails_its_requests_and_the_loop_keeps_going(
        engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = engine.engine.model_runner
    real = runner.execute_model
    calls = {"n": 0}

    def flaky(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device failure")
        return real(scheduler_output)

    monkeypatch.setattr(runner, "execute_model", flaky)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = await asyncio.gather(collect(engine, "f1", PROMPT, params), collect(engine, "f2", PROMPT[:9], params),
                                   return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    await wait_until_idle(engine)
    assert engine.get_stats().num_free_blocks == NUM_BLOCKS
    ok = await collect(engine, "after", PROMPT, SamplingParams(temperature=0, max_tokens=3))
    assert ok[-1].finished and ok[-1].outputs[0].finish_reason == "length"


async def test_streamed_text_with_a_stop_string_is_never_taken_back(engine: AsyncLLMEngine) -> None:
    tokenizer = engine.tokenizer
    full = await collect(engine, "full", PROMPT, SamplingParams(temperature=0, max_tokens=16))
    tokens = [t for d in full for t in d.outputs[0].token_ids]
    text = "".join(d.outputs[0].text for d in full)
    plain = [i for i in range(4, 14) if not any(tokenizer.is_special(t) for t in tokens[i:i + 3])]
    stop = next(s for s in (tokenizer.decode(tokens[i:i + 3]) for i in plain) if "\ufffd" not in s and s in text)
    deltas = await collect(engine, "stop", PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[stop]))
    assert "".join(d.outputs[0].text for d in deltas) == text[:text.find(stop)]
    assert deltas[-1].outputs[0].finish_reason == "stop" and deltas[-1].outputs[0].stop_reason == stop
