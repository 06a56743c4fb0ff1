"""The model forward, compiled: CUDA graphs for decode steps on CUDA, torch.compile (inductor) regions on CPU.

CUDA: at start, one graph per batch size of `cuda_graph_sizes` is captured for a decode-only step (every
sequence one token), sharing one memory pool, after an eager warm-up run of each (Triton JIT, allocator), so
nothing compiles on the hot path. A decode step of B sequences replays the smallest captured size >= B, its
inputs copied into the graph's static buffers and rows B.. padded with copies of the last real row (the
same token at the same slot: the padded rows write the very values the real row writes, and their outputs
are dropped). Captured with the host-side lengths at their worst case (max_seq_len = max_model_len), so a
kernel's grid and split count are fixed per size and the kernels read true lengths from `seq_lens`. Steps
with prefill chunks, larger batches or longer block tables run eager. The forward must not sync with the
host on the decode path (the packed INT4 experts and the Triton kernels do not); a capture that fails says so.

CPU: the whole forward does not compile into one graph (per-sequence prefill loop, data-dependent MoE
dispatch), so the token-wise regions are compiled in place, dynamic in the token count: every RMSNorm,
SwiGLU MLP (dense layers and shared experts) and router Gate, one graph per feature width and row stride (1 token
and any other count), all warmed up at start: a step compiles nothing.

Padding rows count in the MoE layers' expert load statistics (a few tokens per graph-replayed step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from k2ray.engine.config import EngineConfig
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.deepseek_v3 import MLA, MLP, Gate, RMSNorm, Transformer

# Whether `compile: None` turns the compiled forward on, per device type. CPU: off, it did not show that it pays
# (README, "k2ray against vLLM": 0.95x / 1.08x eager's output tokens per CPU second at 1 / 2 threads, within the
# noise, for ~9 s more start per engine). CUDA: off until a GPU run shows the graphs pay.
COMPILE_BY_DEFAULT = {"cpu": False, "cuda": False}
# Eager runs of each size before its capture: the first JITs the Triton kernels, the second settles the allocator.
NUM_WARMUP_RUNS = 2
# Token counts each compiled CPU region is warmed up with: 1 (torch specialises it) and one dynamic size.
CPU_WARMUP_TOKENS = (1, 2)
COMPILED_REGIONS = (RMSNorm, MLP, Gate)

ForwardFn = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], AttentionMetadata], torch.Tensor]


@dataclass(frozen=True)
class CompileOptions:
    enabled: bool
    cuda_graph_sizes: tuple[int, ...]
    max_model_len: int
    block_size: int

    @classmethod
    def from_config(cls, config: EngineConfig, device: torch.device, max_model_len: int) -> CompileOptions:
        enabled = COMPILE_BY_DEFAULT.get(device.type, False) if config.compile is None else config.compile
        if enabled and device.type == "cuda" and config.ep_size > 1:
            # The expert dispatch's collectives wait on the host: a captured graph could not hold them.
            raise ValueError("compile (CUDA graphs) does not work with ep_size > 1 yet; set compile: false")
        return cls(enabled, tuple(sorted(set(config.cuda_graph_sizes))), max_model_len, config.block_size)


def padded_size(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of the ascending `sizes` that holds `num_seqs`, or None."""
    return next((size for size in sizes if size >= num_seqs), None)


def compiled_forward(model: Transformer, kv_caches: list[torch.Tensor], options: CompileOptions | None) -> ForwardFn:
    """The runner's forward: the model itself, or its compiled form (built and warmed up now)."""
    if options is None or not options.enabled:
        return model
    device = kv_caches[0].device
    if device.type == "cuda":
        return CudaGraphDecode(model, kv_caches, options)
    compile_regions(model)
    return model


def compile_regions(model: nn.Module) -> int:
    """torch.compile every token-wise region of `model` in place and warm each up; returns how many."""
    regions = [m for m in model.modules() if isinstance(m, COMPILED_REGIONS)]
    # MLA normalises c_kv as a view of wkv_a's [T, L + R] output: its row stride is a guard of its own.
    row_strides = {id(m.kv_norm): m.kv_lora_rank + m.qk_rope_head_dim for m in model.modules() if isinstance(m, MLA)}
    param = next(model.parameters())
    with torch.inference_mode():
        for module in regions:
            module.compile(dynamic=True)
            width = module.weight.shape[0] if isinstance(module, RMSNorm) else \
                module.w1.in_features if isinstance(module, MLP) else module.weight.shape[1]
            for stride in sorted({width, row_strides.get(id(module), width)}):
                for num_tokens in CPU_WARMUP_TOKENS:
                    rows = torch.zeros(num_tokens, stride, dtype=param.dtype, device=param.device)
                    module(rows[:, :width])
    return len(regions)


class CudaGraphDecode:
    """Callable as Transformer.forward; decode-only steps replay captured graphs (module docstring).

    The hidden states returned for a replayed step are a view of the graph's output buffer: valid until the
    next call, which is how the runner uses them (logits are taken before the next step)."""

    def __init__(self, model: Transformer, kv_caches: list[torch.Tensor], options: CompileOptions) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = options.cuda_graph_sizes
        self.max_model_len = options.max_model_len
        self.max_num_blocks = -(-options.max_model_len // options.block_size)
        device, max_size = kv_caches[0].device, self.sizes[-1]
        self.input_ids = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_size, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_size, self.max_num_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size], num_decodes=size,
            max_seq_len=self.max_model_len, query_start_loc_cpu=tuple(range(size + 1)),
            seq_lens_cpu=(self.max_model_len,) * size)

    def _run(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._metadata(size))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # The buffers point every row at slot 0 of block 0: no request holds a block yet, so writing it is harmless.
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(NUM_WARMUP_RUNS):
                    self._run(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._run(size)
            except RuntimeError as exc:
                raise RuntimeError(f"capturing the decode forward as a CUDA graph (batch {size}) failed: the "
                                   f"forward must not sync with the host on its decode path; set compile: false "
                                   f"to run eager ({exc})") from exc
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def graph_size(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> int | None:
        """The captured size this step replays, or None (it runs eager)."""
        num_tokens = input_ids.shape[0]
        if num_tokens == 0 or meta.num_decodes != num_tokens or meta.num_seqs != num_tokens \
                or max(meta.seq_lens_cpu) > self.max_model_len or meta.block_tables.shape[1] > self.max_num_blocks:
            return None
        return padded_size(num_tokens, self.sizes)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        size = self.graph_size(input_ids, meta)
        if size is None or kv_caches is not self.kv_caches:
            return self.model(input_ids, positions, kv_caches, meta)
        n, width = input_ids.shape[0], meta.block_tables.shape[1]
        pad = size - n
        for static, live in ((self.input_ids, input_ids), (self.positions, positions),
                             (self.slot_mapping, meta.slot_mapping), (self.seq_lens, meta.seq_lens)):
            static[:n].copy_(live, non_blocking=True)
            if pad:
                static[n:size].copy_(live[n - 1:].expand(pad), non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if pad:
            self.block_tables[n:size, :width].copy_(meta.block_tables[n - 1:].expand(pad, width), non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
