from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.config import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    EngineConfig,
    resolve_device,
    resolve_dtype,
    resolve_kernel_backend,
)
from k2ray.engine.kv_cache_manager import KVCacheManager
from k2ray.engine.model_runner import ModelRunner, num_kv_blocks_for_budget
from k2ray.engine.output_processor import OutputProcessor
from k2ray.engine.outputs import RequestOutput
from k2ray.engine.request import Request, RequestStatus
from k2ray.engine.scheduler import Scheduler
from k2ray.model.args import ModelArgs
from k2ray.model.loader import load_model
from k2ray.sampling_params import SamplingParams


class EngineError(RuntimeError):
    """The engine failed while serving a request; the request is finished and its blocks freed."""


class EngineStepError(EngineError):
    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int
    prefix_cache_queries: int
    prefix_cache_hits: int


def _eos_token_ids(tokenizer: K2Tokenizer | None, args: ModelArgs) -> frozenset[int]:
    if tokenizer is not None:
        return frozenset(tokenizer.stop_token_ids)
    eos = args.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos) if isinstance(eos, tuple) else frozenset({eos})


def _num_kv_blocks(config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_memory_bytes
    if budget is None and device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * config.gpu_kv_cache_fraction)
    return num_kv_blocks_for_budget(args, dtype, config.block_size, budget or DEFAULT_CPU_KV_CACHE_BYTES)


class LLMEngine:
    """Synchronous engine: `step()` = schedule -> run the model -> update requests -> outputs."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device, config.model)
        model = load_model(config.model, dtype, device, resolve_kernel_backend(config.kernel_backend, device))
        self.model_args: ModelArgs = model.args
        self.tokenizer = None if config.skip_tokenizer_init else K2Tokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model_args)
        num_blocks = _num_kv_blocks(config, self.model_args, dtype, device)
        self.max_model_len = config.max_model_len or self.model_args.max_position_embeddings
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill)
        self.model_runner = ModelRunner(model, num_blocks, config.block_size, config.seed)
        self.output_processor = OutputProcessor(self.tokenizer)

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     sampling_params: SamplingParams) -> Request:
        """Validate (raises RequestRejected) without touching engine state; safe from any thread."""
        if sampling_params.n != 1:
            raise ValueError("engine requests are single-sequence; fan out n > 1 before add_request")
        vocab_size = self.model_args.vocab_size
        if any(not 0 <= token_id < vocab_size for token_id in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        return self.scheduler.make_request(request_id, prompt_token_ids, sampling_params, self.eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        self.add_prepared_request(self.make_request(request_id, prompt_token_ids, sampling_params),
                                  prompt, stream)

    def add_prepared_request(self, request: Request, prompt: str | None = None, stream: bool = False) -> None:
        self.output_processor.add_request(request.request_id, prompt, request.prompt_token_ids,
                                          request.sampling_params, stream)
        try:
            self.scheduler.add_request(request)
        except ValueError:
            self.output_processor.abort(request.request_id)
            raise

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        for request_id in request_ids:
            self.output_processor.abort(request_id)
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished_requests > 0

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        try:
            runner_output = self.model_runner.execute_model(scheduler_output)
        except Exception as exc:
            request_ids = [seq.request_id for seq in scheduler_output.scheduled]
            for request_id in request_ids:
                self.output_processor.abort(request_id)
            self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)
            self.model_runner.remove_requests(set(request_ids))
            raise EngineStepError(request_ids, exc) from exc
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        stopped = self.output_processor.update(updated, runner_output.logprobs)
        if stopped:
            self.scheduler.finish_requests([r.request_id for r in stopped], RequestStatus.FINISHED_STOPPED)
        return self.output_processor.make_outputs(updated)

    def get_stats(self) -> EngineStats:
        manager = self.kv_cache_manager
        return EngineStats(manager.num_free_blocks, manager.num_total_blocks, len(self.scheduler.running),
                           len(self.scheduler.waiting), manager.prefix_cache_queries, manager.prefix_cache_hits)
