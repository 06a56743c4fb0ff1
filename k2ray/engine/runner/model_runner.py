from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2ray.engine.kv.kv_transfer import LatentKVLayout
from k2ray.engine.outputs import (
    ModelRunnerOutput,
    NewRequestData,
    SampledLogprobs,
    ScheduledSequence,
    SchedulerOutput,
)
from k2ray.engine.runner.compiled_forward import CompileOptions, compiled_forward
from k2ray.engine.runner.input_batch import InputBatch, StepInputs
from k2ray.engine.runner.sampler import Sampler, SamplerOutput, samples_greedily
from k2ray.engine.structured.structured_output import (
    RequestGrammar,
    StructuredOutputManager,
    apply_grammar_bitmask,
)
from k2ray.model.args import ModelArgs
from k2ray.model.attention_metadata import DEFAULT_PREFILL_CONTEXT_CHUNK
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
    sampling_params: SamplingParams
    grammar: RequestGrammar | None = None


class ModelRunner:
    """Owns the model, the paged latent KV cache (per layer [num_blocks, block_size, kv_cache_dim])
    and the sampler; its requests' rows live in a persistent InputBatch. One call per step: SchedulerOutput
    in, ModelRunnerOutput out, one host sync (the sampled token ids)."""

    def __init__(self, model: Transformer, num_kv_blocks: int, block_size: int, seed: int,
                 structured_output: StructuredOutputManager | None = None,
                 prefill_context_chunk: int = DEFAULT_PREFILL_CONTEXT_CHUNK,
                 compile_options: CompileOptions | None = None) -> None:
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
        self.forward = compiled_forward(model, self.kv_caches, compile_options)  # the model, or its compiled form
        self.requests: dict[str, _RunnerRequest] = {}
        self.structured_output = structured_output
        default_generator = torch.Generator(device=self.device)
        default_generator.manual_seed(seed)
        self.sampler = Sampler(default_generator)
        self.input_batch = InputBatch(block_size, self.args.vocab_size, self.device, prefill_context_chunk)
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
        hidden = self.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata)
        if not inputs.sampled_ids:
            return ModelRunnerOutput({}, {})
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [N, V] float32
        states = [self.requests[request_id] for request_id in inputs.sampled_ids]
        grammars = [s.grammar for s in states]
        has_grammar = any(g is not None for g in grammars)
        if has_grammar:
            apply_grammar_bitmask(logits, grammars)
        sampled = self.sampler(logits, self.input_batch.sampling_metadata(inputs), overwrite_logits=True)
        token_ids = sampled.sampled_token_ids.tolist()
        self.input_batch.append_sampled(inputs.sampled_row_ids, token_ids)
        if has_grammar:
            for state, token_id in zip(states, token_ids, strict=True):
                if state.grammar is not None:
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
            self.input_batch.remove_request(request_id)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        self.remove_requests(scheduler_output.finished_request_ids)
        for request_id in scheduler_output.preempted_request_ids:
            self.input_batch.forget_blocks(request_id)
        for new in scheduler_output.new_requests:
            self.requests[new.request_id] = _RunnerRequest(new.sampling_params, self._request_grammar(new))
            self.input_batch.add_request(new.request_id, new.prompt_token_ids, new.output_token_ids,
                                         new.sampling_params, self._request_generator(new))

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
        if not samples_greedily(params):
            # Each token sampled elsewhere (a prefill engine's first token) drew one noise row from
            # this seed; skip those rows so the seeded stream goes on as if sampled here.
            noise = torch.empty(self.args.vocab_size, dtype=torch.float32, device=self.device)
            for _ in new.output_token_ids:
                noise.exponential_(generator=generator)
        return generator

    def _prepare_inputs(self, seqs: list[ScheduledSequence]) -> StepInputs:
        return self.input_batch.prepare_inputs(seqs)

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
