"""The compiled forward: inductor regions on CPU give eager's greedy tokens; on CUDA (gpu marker) decode steps
replayed from the captured graphs, at every ladder size and padded sizes between, give eager's hidden states
and, through the engine, its greedy tokens."""

from __future__ import annotations

import pytest
import torch

from k2ray import LLM, SamplingParams
from k2ray.engine.config import EngineConfig
from k2ray.engine.runner.compiled_forward import (
    COMPILE_BY_DEFAULT,
    CompileOptions,
    CudaGraphDecode,
    padded_size,
)
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.deepseek_v3 import RMSNorm
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model

PROMPT_LENS = (3, 17, 40, 9, 1, 26)
GRAPH_SIZES = (1, 2, 4, 8)
BF16_TOL = 5e-2


def _prompts(vocab_size: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(0, vocab_size, (n,), generator=gen).tolist()} for n in PROMPT_LENS]


def _greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    return [list(out.outputs[0].token_ids) for out in outs]


def test_padded_size_takes_the_smallest_size_that_holds_the_batch():
    assert [padded_size(n, GRAPH_SIZES) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]


def test_compile_none_takes_the_devices_default_and_the_ladder_is_sorted():
    config = EngineConfig(model="unused", cuda_graph_sizes=(8, 2, 2, 1))
    options = CompileOptions.from_config(config, torch.device("cpu"), 512)
    assert options.enabled is COMPILE_BY_DEFAULT["cpu"]
    assert options.cuda_graph_sizes == (1, 2, 8)
    forced = CompileOptions.from_config(EngineConfig(model="unused", compile=True), torch.device("cpu"), 512)
    assert forced.enabled


@pytest.mark.parametrize("sizes", [(), (0, 4)])
def test_bad_graph_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        EngineConfig(model="unused", cuda_graph_sizes=sizes)


@pytest.mark.compile  # inductor compiles a dozen graphs: over 30 s on 2 shared cores
def test_compiled_regions_give_eagers_greedy_tokens():
    kwargs = dict(skip_tokenizer_init=True, block_size=4, num_kv_blocks=256, max_model_len=256, device="cpu")
    eager = LLM(tiny_checkpoint_dir(), compile=False, **kwargs)
    prompts = _prompts(eager.llm_engine.model_args.vocab_size)
    expected = _greedy(eager, prompts)
    compiled = LLM(tiny_checkpoint_dir(), compile=True, **kwargs)
    norms = [m for m in compiled.llm_engine.model_runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m._compiled_call_impl is not None for m in norms)  # compiled in place, at start
    assert _greedy(compiled, prompts) == expected


def _decode_step(num_seqs: int, block_size: int, num_blocks: int, max_len: int, vocab_size: int, device):
    gen = torch.Generator().manual_seed(num_seqs)
    seq_lens = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    width = -(-int(seq_lens.max()) // block_size)
    block_tables = torch.randperm(num_blocks, generator=gen)[:num_seqs * width].view(num_seqs, width)
    last = seq_lens - 1
    slots = block_tables[torch.arange(num_seqs), last // block_size] * block_size + last % block_size
    meta = AttentionMetadata(
        query_start_loc=torch.arange(num_seqs + 1, device=device), seq_lens=seq_lens.to(device),
        block_tables=block_tables.to(torch.int32).to(device), slot_mapping=slots.to(device), num_decodes=num_seqs,
        max_seq_len=int(seq_lens.max()), query_start_loc_cpu=tuple(range(num_seqs + 1)),
        seq_lens_cpu=tuple(seq_lens.tolist()))
    input_ids = torch.randint(0, vocab_size, (num_seqs,), generator=gen).to(device)
    return input_ids, last.to(device), meta


@pytest.mark.gpu
@torch.inference_mode()
def test_graphs_replay_every_ladder_size_like_eager():
    device = torch.device("cuda")
    model = load_model(tiny_checkpoint_dir(), torch.bfloat16, device, "triton")
    block_size, max_len = 16, 256
    num_blocks = (GRAPH_SIZES[-1] + 1) * (max_len // block_size)  # room for the eager-only batch too
    gen = torch.Generator(device=device).manual_seed(0)
    kv_caches = [torch.randn(num_blocks, block_size, model.args.kv_cache_dim, generator=gen, device=device,
                             dtype=torch.bfloat16) for _ in range(model.args.num_hidden_layers)]
    graphs = CudaGraphDecode(model, kv_caches, CompileOptions(True, GRAPH_SIZES, max_len, block_size))
    assert sorted(graphs.graphs) == list(GRAPH_SIZES)
    for num_seqs in range(1, GRAPH_SIZES[-1] + 2):
        input_ids, positions, meta = _decode_step(num_seqs, block_size, num_blocks, max_len, model.args.vocab_size,
                                                  device)
        assert graphs.graph_size(input_ids, meta) == padded_size(num_seqs, GRAPH_SIZES)
        expected = model(input_ids, positions, kv_caches, meta)
        got = graphs(input_ids, positions, kv_caches, meta).clone()
        assert got.shape == expected.shape
        # bf16, and the graph's split-KV count is fixed at capture (max_model_len) where eager sizes it to the
        # batch: rounding differs, a wrong row or padding bug would not be close at all
        torch.testing.assert_close(got, expected, rtol=BF16_TOL, atol=BF16_TOL)


@pytest.mark.gpu
def test_engine_with_graphs_gives_eagers_greedy_tokens():
    kwargs = dict(skip_tokenizer_init=True, num_kv_blocks=256, max_model_len=256, device="cuda")
    eager = LLM(tiny_checkpoint_dir(), compile=False, **kwargs)
    prompts = _prompts(eager.llm_engine.model_args.vocab_size)
    expected = _greedy(eager, prompts)
    del eager
    graphed = LLM(tiny_checkpoint_dir(), compile=True, cuda_graph_sizes=GRAPH_SIZES, **kwargs)
    assert isinstance(graphed.llm_engine.model_runner.forward, CudaGraphDecode)
    assert _greedy(graphed, prompts) == expected
