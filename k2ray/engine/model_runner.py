from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from k2ray.engine.kv.kv_transfer import LatentKVLayout
from k2ray.engine.outputs import (
    ModelRunnerOutput,
    NewRequestData,
    SampledLogprobs,
    ScheduledSequence,
    SchedulerOutput,
)
from k2ray.engine.sampler import GREEDY_TEMPERATURE, Sampler, SamplerOutput, build_sampling_metadata
from k2ray.engine.structured.structured_output import (
    RequestGrammar,
    StructuredOutputManager,
    apply_grammar_bitmask,
)
from k2ray.model.args import ModelArgs
from k2ray.model.attention_metadata import DEFAULT_PREFILL_CONTEXT_CHUNK, AttentionMetadata
from k2ray.model.deepseek_v3 import ExpertLoad, Transformer
from k2ray.sampling_params import SamplingParams


def kv_cache_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """MLA's latent cache: one [kv_lora_rank + qk_rope_head_dim] row per token per layer, no K/V
    pair, no heads (70,272 bytes for K2 in bf16)."""
    return args.num_hidden_layers * args.kv_cache_dim * dtype.itemsize


def num_kv_blocks_for_budget(args: ModelArgs, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    num_blocks = budget_bytes // (kv_cache_bytes_per_token(args, dtype) * block_size)
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes does not hold one block of {block_size} tokens")
    return num_blocks


@dataclass(slots=True)
class _RunnerRequest:
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    grammar: RequestGrammar | None = None


@dataclass(frozen=True, slots=True)
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampled_ids: list[str]


class ModelRunner:
    """Owns the model, the paged latent KV cache (per layer [num_blocks, block_size, kv_cache_dim])
    and the sampler. One call per step: SchedulerOutput in, ModelRunnerOutput out, one host sync
    (the sampled token ids)."""

    def __init__(self, model: Transformer, num_kv_blocks: int, block_size: int, seed: int,
                 structured_output: StructuredOutputManager | None = None,
                 prefill_context_chunk: int = DEFAULT_PREFILL_CONTEXT_CHUNK) -> None:
        self.model = model
        self.prefill_context_chunk = prefill_context_chunk
        self.args = model.args
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.kv_caches = [
            torch.zeros(num_kv_blocks, block_size, self.args.kv_cache_dim, dtype=self.dtype, device=self.device)
            for _ in range(self.args.num_hidden_layers)
        ]
        self.requests: dict[str, _RunnerRequest] = {}
        self.structured_output = structured_output
        default_generator = torch.Generator(device=self.device)
        default_generator.manual_seed(seed)
        self.sampler = Sampler(default_generator)
        # The runner owns the model's expert load counters from here on: they count its steps.
        self.model.take_expert_load()  # drop what a profiling step counted

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput({}, {})
        # Single-token sequences (decodes) first: the model runs them in the absorbed form.
        seqs = sorted(scheduler_output.scheduled, key=lambda s: len(s.token_ids) != 1)
        inputs = self._prepare_inputs(seqs)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata)
        if not inputs.sampled_ids:
            return ModelRunnerOutput({}, {})
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [N, V] float32
        states = [self.requests[request_id] for request_id in inputs.sampled_ids]
        grammars = [s.grammar for s in states]
        has_grammar = any(g is not None for g in grammars)
        if has_grammar:
            apply_grammar_bitmask(logits, grammars)
        metadata = build_sampling_metadata(
            [s.sampling_params for s in states], [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states], [s.generator for s in states],
            logits.shape[1], self.device)
        sampled = self.sampler(logits, metadata)
        token_ids = sampled.sampled_token_ids.tolist()
        for state, token_id in zip(states, token_ids, strict=True):
            state.output_token_ids.append(token_id)
            if has_grammar and state.grammar is not None:
                state.grammar.accept(token_id)
        return ModelRunnerOutput(dict(zip(inputs.sampled_ids, token_ids, strict=True)),
                                 self._logprobs(inputs.sampled_ids, states, sampled))

    def expert_load(self) -> ExpertLoad:
        """Tokens routed per (MoE layer, expert) by this runner's steps so far, on the host: one device-to-host
        copy per call, none in the forward (the counters are only read, so a step may run meanwhile)."""
        load = self.model.expert_load()
        return ExpertLoad(load.logical.cpu(), load.physical.cpu())

    @property
    def kv_layout(self) -> LatentKVLayout:
        return LatentKVLayout(self.args.num_hidden_layers, self.block_size, self.args.kv_cache_dim, self.dtype)

    @torch.inference_mode()
    def read_kv_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Latent KV of `block_ids` as one contiguous [num_layers, n, block_size, kv_cache_dim]
        tensor on the cache's device, ready for a send; into `out` (of that shape) if given, so a
        transfer can reuse its staging buffers."""
        index = self._block_index(block_ids)
        shape = self.kv_layout.shape(len(block_ids))
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != self.dtype or out.device != self.device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {list(shape)} {self.dtype} tensor on {self.device}")
        for layer, cache in enumerate(self.kv_caches):
            torch.index_select(cache, 0, index, out=out[layer])
        return out

    @torch.inference_mode()
    def write_kv_blocks(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Store `kv` ([num_layers, n, block_size, kv_cache_dim], as read_kv_blocks gives it) into
        `block_ids`, which must be distinct."""
        index = self._block_index(block_ids)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"block ids to write must be distinct, got {list(block_ids)}")
        expected = self.kv_layout.shape(len(block_ids))
        if tuple(kv.shape) != expected or kv.dtype != self.dtype:
            raise ValueError(f"latent KV must be {list(expected)} {self.dtype}, got {list(kv.shape)} {kv.dtype}")
        kv = kv.to(self.device)
        for layer, cache in enumerate(self.kv_caches):
            cache.index_copy_(0, index, kv[layer])

    def _block_index(self, block_ids: Sequence[int]) -> torch.Tensor:
        if any(not 0 <= block_id < self.num_kv_blocks for block_id in block_ids):
            raise ValueError(f"block ids must be in [0, {self.num_kv_blocks}), got {list(block_ids)}")
        return torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)

    def is_grammar_terminated(self, request_id: str) -> bool:
        """The request's grammar is complete (its last token was a stop token the grammar took)."""
        state = self.requests.get(request_id)
        return state is not None and state.grammar is not None and state.grammar.is_terminated

    def remove_requests(self, request_ids: set[str] | frozenset[str]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        self.remove_requests(scheduler_output.finished_request_ids)
        for new in scheduler_output.new_requests:
            self.requests[new.request_id] = _RunnerRequest(list(new.prompt_token_ids), new.sampling_params,
                                                           self._request_generator(new), list(new.output_token_ids),
                                                           self._request_grammar(new))

    def _request_grammar(self, new: NewRequestData) -> RequestGrammar | None:
        params = new.sampling_params.structured_output
        if params is None:
            return None
        if self.structured_output is None or new.grammar is None:
            raise ValueError(f"request {new.request_id!r} is constrained but came without a compiled grammar")
        return self.structured_output.new_grammar(new.grammar, params, new.output_token_ids)

    def _request_generator(self, new: NewRequestData) -> torch.Generator | None:
        params = new.sampling_params
        if params.seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed)
        if params.temperature >= GREEDY_TEMPERATURE:
            # Each token sampled elsewhere (a prefill engine's first token) drew one noise row from
            # this seed; skip those rows so the seeded stream goes on as if sampled here.
            noise = torch.empty(self.args.vocab_size, dtype=torch.float32, device=self.device)
            for _ in new.output_token_ids:
                noise.exponential_(generator=generator)
        return generator

    def _prepare_inputs(self, seqs: list[ScheduledSequence]) -> _StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sampled_ids: list[str] = []
        block_size = self.block_size
        for seq in seqs:
            start, num_new = seq.num_computed_tokens, len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(start, start + num_new))
            block_ids = seq.block_ids
            slot_mapping.extend(block_ids[pos // block_size] * block_size + pos % block_size
                                for pos in range(start, start + num_new))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(start + num_new)
            if seq.sample:
                logits_indices.append(query_start_loc[-1] - 1)
                sampled_ids.append(seq.request_id)
        width = max(len(seq.block_ids) for seq in seqs)
        block_tables = [seq.block_ids + [0] * (width - len(seq.block_ids)) for seq in seqs]
        device = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        metadata = AttentionMetadata(
            query_start_loc=tensor(query_start_loc, torch.int64), seq_lens=tensor(seq_lens, torch.int64),
            block_tables=tensor(block_tables, torch.int32), slot_mapping=tensor(slot_mapping, torch.int64),
            num_decodes=sum(1 for seq in seqs if len(seq.token_ids) == 1), max_seq_len=max(seq_lens),
            query_start_loc_cpu=tuple(query_start_loc), seq_lens_cpu=tuple(seq_lens),
            prefill_context_chunk=self.prefill_context_chunk)
        return _StepInputs(tensor(input_ids, torch.int64), tensor(positions, torch.int64), metadata,
                           tensor(logits_indices, torch.int64), sampled_ids)

    @staticmethod
    def _logprobs(request_ids: list[str], states: list[_RunnerRequest],
                  sampled: SamplerOutput) -> dict[str, SampledLogprobs]:
        if sampled.sampled_logprobs is None:
            return {}
        logprobs, ranks = sampled.sampled_logprobs.tolist(), sampled.sampled_ranks.tolist()
        top_ids = sampled.top_token_ids.tolist() if sampled.top_token_ids is not None else None
        top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        out = {}
        for row, (request_id, state) in enumerate(zip(request_ids, states, strict=True)):
            num_top = state.sampling_params.logprobs
            if num_top is None:
                continue
            out[request_id] = SampledLogprobs(
                logprobs[row], ranks[row],
                top_ids[row][:num_top] if top_ids is not None else [],
                top_lps[row][:num_top] if top_lps is not None else [])
        return out
