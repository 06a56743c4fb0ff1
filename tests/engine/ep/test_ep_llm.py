"""LLM(..., ep_size=N): N rank processes over gloo on CPU, k2-tiny's 16 routed experts sharded 16 / N per rank,
stepping in lockstep. Greedy outputs equal ep_size 1's, for requests of very different lengths spread over the
ranks and for a lone request (the other ranks run empty forwards through the dispatch every step)."""

from __future__ import annotations

import pytest
import torch

from k2ray import LLM, SamplingParams
from k2ray.engine.ep.ep_protocol import RankFailed
from k2ray.engine.errors import EngineError
from k2ray.engine.scheduler import RequestRejected
from k2ray.model.default_checkpoint import tiny_checkpoint_dir

ENGINE = {"dtype": "float32", "device": "cpu", "kernel_backend": "torch", "num_kv_blocks": 96, "block_size": 8,
          "max_model_len": 256, "max_num_batched_tokens": 256, "skip_tokenizer_init": True,
          "enable_structured_output": False, "ep_timeout_s": 120.0}
# (prompt length, max_tokens): long and short prompts, long and short generations, on different ranks.
SHAPES = [(90, 4), (3, 12), (41, 2), (7, 9), (120, 6), (1, 5)]
PROMPT_VOCAB = 512
SURVIVOR_EXIT_TIMEOUT_S = 60.0


def prompts() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(0, PROMPT_VOCAB, (n,), generator=generator).tolist()}
            for n, _ in SHAPES]


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in SHAPES]


def token_ids(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    llm = LLM(tiny_checkpoint_dir(), **ENGINE)
    return token_ids(llm.generate(prompts(), params()))


@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_group_generates_what_one_engine_does(ep_size, reference):
    llm = LLM(tiny_checkpoint_dir(), ep_size=ep_size, **ENGINE)
    try:
        engine = llm.llm_engine
        assert len(engine.pids) == ep_size
        assert token_ids(llm.generate(prompts(), params())) == reference
        # A lone request: every other rank has nothing and still steps with it.
        lone = llm.generate(prompts()[1], params()[1])
        assert token_ids(lone) == [reference[1]]
        # Requests spread over the ranks by load.
        for index, prompt in enumerate(prompts()[:ep_size]):
            engine.add_request(f"spread-{index}", prompt["prompt_token_ids"], params()[index])
        assert sorted(engine.rank_of(f"spread-{i}") for i in range(ep_size)) == list(range(ep_size))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert [done[f"spread-{i}"].outputs[0].token_ids for i in range(ep_size)] == reference[:ep_size]
        # A rejected prompt fails its call clearly and the group keeps serving.
        with pytest.raises(RequestRejected):
            llm.generate({"prompt_token_ids": [0] * 300}, params()[0])
        assert token_ids(llm.generate(prompts()[0], params()[0])) == [reference[0]]
    finally:
        llm.llm_engine.shutdown()


def test_ep_size_must_divide_the_routed_experts():
    with pytest.raises(ValueError, match="must divide"):
        LLM(tiny_checkpoint_dir(), ep_size=3, **ENGINE)


def test_a_killed_rank_fails_its_group_within_the_timeout():
    llm = LLM(tiny_checkpoint_dir(), ep_size=2, **{**ENGINE, "ep_timeout_s": 30.0})
    engine = llm.llm_engine
    try:
        for index in range(4):
            engine.add_request(str(index), prompts()[1]["prompt_token_ids"],
                               SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), stream=True)
        while not engine.step():
            pass  # the first outputs: both ranks are decoding
        victim, survivor = engine._ranks
        survivor_ids = [str(i) for i in range(4) if engine.rank_of(str(i)) == survivor.index]
        assert survivor_ids
        victim.process.kill()
        with pytest.raises(EngineError, match="EP group failed"):
            for _ in range(100):
                engine.step()
        assert not engine.has_unfinished_requests()
        # The survivor lost its group: it ended its requests, freed every block, reported it and exited.
        survivor.process.wait(SURVIVOR_EXIT_TIMEOUT_S)
        reports = list(engine.rank_failures)
        while True:
            try:
                reports.append(survivor.conn.recv())
            except (EOFError, OSError):
                break
        failure = next(r for r in reports if isinstance(r, RankFailed))
        assert "lost its group" in failure.message
        assert sorted(failure.request_ids) == sorted(survivor_ids)
        assert failure.num_free_blocks == failure.num_total_blocks
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL EP group needs 2 GPUs")
def test_ep_group_over_nccl_generates_what_one_gpu_does():
    """Rank r on cuda:r, the group over NCCL, the routed experts packed INT4 through the fused MoE kernel."""
    gpu = {**ENGINE, "device": "cuda", "kernel_backend": "triton"}
    expected = token_ids(LLM(tiny_checkpoint_dir(), **gpu).generate(prompts(), params()))
    llm = LLM(tiny_checkpoint_dir(), ep_size=2, **gpu)
    try:
        assert token_ids(llm.generate(prompts(), params())) == expected
    finally:
        llm.llm_engine.shutdown()
