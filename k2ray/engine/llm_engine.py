from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.config import EngineConfig, resolve_device, resolve_dtype, resolve_kernel_backend
from k2ray.engine.ep.expert_stats import ExpertLoadStats
from k2ray.engine.errors import EngineStepError, KVLeaseExpired, StepRejected
from k2ray.engine.host_allocator import MallocTuning, tune_host_allocator
from k2ray.engine.kv.kv_cache_manager import KVCacheManager
from k2ray.engine.kv.kv_sizing import log_kv_capacity, num_kv_blocks
from k2ray.engine.kv.kv_transfer import KVReservation, PrefillResult
from k2ray.engine.output_processor import OutputProcessor
from k2ray.engine.outputs import ModelRunnerOutput, RequestOutput, SchedulerOutput
from k2ray.engine.request import Request, RequestStatus
from k2ray.engine.runner.compiled_forward import CompileOptions
from k2ray.engine.runner.model_runner import ModelRunner
from k2ray.engine.scheduler import RequestRejected, Scheduler
from k2ray.engine.structured.structured_output import GrammarError, StructuredOutputManager
from k2ray.model.args import ModelArgs
from k2ray.model.deepseek_v3 import ExpertDispatch
from k2ray.model.loader import load_model
from k2ray.sampling_params import SamplingParams

# Grammars compile on a pool this wide, off the step loop.
NUM_GRAMMAR_THREADS = 2
# A step with nothing to run but grammars compiling waits this long for one, instead of spinning.
GRAMMAR_WAIT_S = 0.01


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_cached_blocks: int  # blocks in the prefix cache, held or free
    num_preemptions: int
    num_prompt_tokens: int  # prompt tokens computed (prefix-cache hits and received KV excluded)
    num_generation_tokens: int
    expert_load: ExpertLoadStats | None = None  # MoE models: tokens routed per expert / per EP rank (ep/expert_stats.py)


def _eos_token_ids(tokenizer: K2Tokenizer | None, args: ModelArgs) -> frozenset[int]:
    if tokenizer is not None:
        return frozenset(tokenizer.stop_token_ids)
    eos = args.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos) if isinstance(eos, tuple) else frozenset({eos})


class LLMEngine:
    """Synchronous engine: `step()` = schedule -> run the model -> update requests -> outputs.

    role="prefill": requests stop after their first token; the finished RequestOutput carries a
    PrefillResult and the prompt's KV blocks stay held until `release_prefilled` (or an abort).
    role="decode" (or "both"): `add_prefilled_request` reserves blocks, the caller writes the latent
    KV into them (`model_runner.write_kv_blocks`), `commit_prefilled` starts the decode. Parked
    requests of either kind hold their blocks for `kv_lease_timeout_s` by `clock`; a step then
    fails them (EngineStepError) and frees the blocks.

    A step that raises fails requests, never the engine: those it scheduled if the forward raised,
    every request (parked ones included) if anything else did; either way as EngineStepError, with
    the blocks freed. Constrained requests wait, unscheduled, for their grammar to compile on
    `grammar_executor` (a small thread pool by default).
    """

    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic,
                 grammar_executor: Executor | None = None, ep_rank: int = 0,
                 expert_dispatch: ExpertDispatch | None = None) -> None:
        """With config.ep_size > 1 this is rank `ep_rank` of an EP group and `expert_dispatch` reaches
        the others' experts (k2ray.dist.ep_engine builds both)."""
        self.config = config
        if config.tune_host_malloc:
            tune_host_allocator(MallocTuning())
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device, config.model)
        model = load_model(config.model, dtype, device, resolve_kernel_backend(config.kernel_backend, device),
                           ep_rank=ep_rank, ep_size=config.ep_size, expert_dispatch=expert_dispatch,
                           ep_placement=config.ep_placement)
        self.model_args: ModelArgs = model.args
        self.tokenizer = None if config.skip_tokenizer_init else K2Tokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model_args)
        self.max_model_len = config.max_model_len or self.model_args.max_position_embeddings
        num_blocks = num_kv_blocks(config, model, self.max_model_len, device)
        log_kv_capacity(num_blocks, config.block_size, self.max_model_len, model)
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill, config.kv_lease_timeout_s,
                                   clock, config.decode_reserved_share)
        self._owned_executor = None
        if grammar_executor is None and config.enable_structured_output:
            grammar_executor = self._owned_executor = ThreadPoolExecutor(NUM_GRAMMAR_THREADS, "k2ray-grammar")
        self.structured_output, self._no_structured_output = self._make_structured_output(grammar_executor)
        self._grammar_futures: dict[str, Future] = {}
        self.model_runner = ModelRunner(model, num_blocks, config.block_size, config.seed, self.structured_output,
                                        config.prefill_context_chunk,
                                        CompileOptions.from_config(config, device, self.max_model_len))
        self.output_processor = OutputProcessor(self.tokenizer)
        # Outputs made outside a step (a committed request's first token), returned by the next step.
        self._pending_outputs: list[RequestOutput] = []
        # Monotone totals for get_stats (the serve replica relays them as counters).
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    def _make_structured_output(self, executor: Executor | None) -> tuple[StructuredOutputManager | None,
                                                                          str | None]:
        """The manager (vocabulary and compiler built now), or None and why structured output is off."""
        if executor is None:
            return None, "structured output is disabled on this engine"
        tokenizer = self.tokenizer
        if tokenizer is None:  # serving token ids only: the vocabulary still comes from the checkpoint
            try:
                tokenizer = K2Tokenizer.from_pretrained(self.config.model)
            except OSError as exc:
                return None, f"structured output needs the checkpoint's tokenizer: {exc}"
        return StructuredOutputManager(tokenizer, self.model_args.vocab_size, self.eos_token_ids, executor), None

    def shutdown(self) -> None:
        """Stop the engine's own grammar threads (pending compilations are dropped)."""
        if self._owned_executor is not None:
            self._owned_executor.shutdown(wait=False, cancel_futures=True)

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     sampling_params: SamplingParams) -> Request:
        """Validate (raises RequestRejected) without touching engine state; safe from any thread."""
        if sampling_params.n != 1:
            raise ValueError("engine requests are single-sequence; fan out n > 1 before add_request")
        vocab_size = self.model_args.vocab_size
        if any(not 0 <= token_id < vocab_size for token_id in prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab_size})")
        self._check_structured_output(sampling_params)
        return self.scheduler.make_request(request_id, prompt_token_ids, sampling_params, self.eos_token_ids,
                                           remote_decode=self.config.role == "prefill")

    def _check_structured_output(self, sampling_params: SamplingParams) -> None:
        # Parsing (not compiling) here turns a bad schema into a rejection before the request is queued.
        params = sampling_params.structured_output
        if params is None:
            return
        if self.structured_output is None:
            raise RequestRejected(self._no_structured_output)
        try:
            self.structured_output.check(params)
        except GrammarError as exc:
            raise RequestRejected(str(exc)) from None

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        self.add_prepared_request(self.make_request(request_id, prompt_token_ids, sampling_params),
                                  prompt, stream)

    def add_prepared_request(self, request: Request, prompt: str | None = None, stream: bool = False) -> None:
        # Scheduler first: a duplicate id must be refused before it can clobber the live request's output state.
        self.scheduler.add_request(request)
        self._add_output_state(request, prompt, stream)
        self._start_grammar(request)

    def _start_grammar(self, request: Request) -> None:
        params = request.sampling_params.structured_output
        if params is not None and self.structured_output is not None and request.grammar is None:
            self._grammar_futures[request.request_id] = self.structured_output.submit(params)

    def _add_output_state(self, request: Request, prompt: str | None, stream: bool) -> None:
        try:
            self.output_processor.add_request(request.request_id, prompt, request.prompt_token_ids,
                                              request.sampling_params, stream)
        except ValueError:
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_ABORTED)
            raise

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        for request_id in request_ids:
            self.output_processor.abort(request_id)
            self._grammar_futures.pop(request_id, None)
        if self._pending_outputs:
            aborted = set(request_ids)
            self._pending_outputs = [o for o in self._pending_outputs if o.request_id not in aborted]
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished_requests > 0 or bool(self._pending_outputs)

    def step(self) -> list[RequestOutput]:
        try:
            return self._step()
        except EngineStepError:
            raise
        except Exception as exc:  # not tied to one step's requests: fail them all, parked ones too
            request_ids = self.scheduler.all_request_ids()
            self.kv_cache_manager.uncache_uncommitted()
            self._fail_requests(request_ids)
            self._pending_outputs = []
            raise EngineStepError(request_ids, exc) from exc

    def _step(self) -> list[RequestOutput]:
        # Failures found before anything is scheduled: no other request loses this step's work.
        if expired := self.expire_leases():
            raise EngineStepError(expired, KVLeaseExpired(
                f"KV blocks held past kv_lease_timeout_s ({self.config.kv_lease_timeout_s} s)"))
        rejected, error = self._admit_grammars()
        if rejected:
            self._fail_requests(rejected)
            raise StepRejected(rejected, error, str(error))
        scheduler_output = self.scheduler.schedule()
        try:
            runner_output = self.model_runner.execute_model(scheduler_output)
        except Exception as exc:
            # Before the requests are freed, so their never-written blocks go back unhashed.
            self.kv_cache_manager.uncache_uncommitted()
            request_ids = [seq.request_id for seq in scheduler_output.scheduled]
            self._fail_requests(request_ids)
            raise EngineStepError(request_ids, exc) from exc
        self._count_tokens(scheduler_output, runner_output)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        stopped = self.output_processor.update(updated, runner_output.logprobs)
        stopped += self._grammar_finished(updated, stopped)
        if stopped:
            self.scheduler.finish_requests([r.request_id for r in stopped], RequestStatus.FINISHED_STOPPED)
        outputs, self._pending_outputs = self._pending_outputs, []
        for output in self.output_processor.make_outputs(updated):
            request = self.scheduler.parked.get(output.request_id)
            if request is not None and request.remote_decode:
                output.prefill_result = self._prefill_result(request, runner_output.logprobs)
            outputs.append(output)
        if scheduler_output.is_empty and self._grammar_futures:
            wait(list(self._grammar_futures.values()), GRAMMAR_WAIT_S, FIRST_COMPLETED)
        return outputs

    def _fail_requests(self, request_ids: list[str]) -> None:
        """Finish `request_ids` with an error (no output; the caller raises) and free their blocks."""
        for request_id in request_ids:
            self.output_processor.abort(request_id)
            self._grammar_futures.pop(request_id, None)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)
        self.model_runner.remove_requests(set(request_ids))

    def expire_leases(self) -> list[str]:
        """Free the blocks of every parked request past its lease; their ids. Each step does this
        first (and fails them); a loop that idles while requests are parked calls it itself."""
        expired = [request.request_id for request in self.scheduler.expire_leases()]
        self._fail_requests(expired)
        return expired

    def _admit_grammars(self) -> tuple[list[str], Exception | None]:
        """Hand each compiled grammar to its request (which may then be scheduled); the requests
        whose grammar failed to compile, and the error."""
        failed, error = [], None
        for request_id, future in list(self._grammar_futures.items()):
            if not future.done():
                continue
            del self._grammar_futures[request_id]
            request = self.scheduler.requests.get(request_id) or self.scheduler.parked.get(request_id)
            if request is None:
                continue
            try:
                request.grammar = future.result()
            except Exception as exc:  # GrammarError, or the pool gave up on it
                failed.append(request_id)
                error = exc
        return failed, error

    def _grammar_finished(self, updated: list[Request], stopped: list[Request]) -> list[Request]:
        """Requests whose grammar just completed but that a stop token did not end (ignore_eos or
        min_tokens): a finished grammar allows no further token, so they stop here."""
        return [r for r in updated if r.sampling_params.structured_output is not None and not r.is_finished
                and r not in stopped and self.model_runner.is_grammar_terminated(r.request_id)]

    def get_stats(self) -> EngineStats:
        manager = self.kv_cache_manager
        return EngineStats(manager.num_free_blocks, manager.num_total_blocks, len(self.scheduler.running),
                           len(self.scheduler.waiting), manager.prefix_cache_queries, manager.prefix_cache_hits,
                           num_cached_blocks=len(manager.block_pool.cached_blocks),
                           num_preemptions=self.scheduler.num_preemptions,
                           num_prompt_tokens=self._num_prompt_tokens,
                           num_generation_tokens=self._num_generation_tokens,
                           expert_load=self._expert_load_stats())

    def _expert_load_stats(self) -> ExpertLoadStats | None:
        if not self.model_runner.model.moe_layers:
            return None
        return ExpertLoadStats.from_load(self.model_runner.expert_load(), self.config.ep_size)

    def _count_tokens(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Totals for `get_stats` of a step whose forward succeeded."""
        for seq in scheduler_output.scheduled:
            request = self.scheduler.requests.get(seq.request_id)
            if request is not None:
                prompt_end = min(seq.num_computed_tokens + len(seq.token_ids), request.num_prompt_tokens)
                self._num_prompt_tokens += max(0, prompt_end - seq.num_computed_tokens)
        self._num_generation_tokens += len(runner_output.sampled_token_ids)

    # ---- disaggregation ----

    def _prefill_result(self, request: Request, logprobs: dict) -> PrefillResult:
        return PrefillResult(request.request_id, request.output_token_ids[0], logprobs.get(request.request_id),
                             request.num_cached_tokens or 0,
                             tuple(self.kv_cache_manager.get_block_ids(request.request_id)),
                             request.num_prompt_tokens)

    def release_prefilled(self, request_id: str) -> bool:
        """Prefill role: free the KV blocks of a finished prefill once the decode side has its KV.
        False if there is nothing to release (already released or aborted)."""
        return self.scheduler.release_prefilled(request_id)

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int], first_token_id: int | None,
                              sampling_params: SamplingParams, prompt: str | None = None,
                              stream: bool = False) -> KVReservation | None:
        """Decode side: reserve blocks for a prompt prefilled elsewhere (raises RequestRejected like
        add_request). Write the KV into `block_ids_to_fill`, then `commit_prefilled`; `abort_requests`
        before that frees the reservation. None when the blocks are not free now. `first_token_id`
        may be None here and come with the PrefillResult at commit."""
        if self.config.role == "prefill":
            raise ValueError("a prefill-role engine does not take prefilled requests")
        request = self.make_request(request_id, prompt_token_ids, sampling_params)
        if first_token_id is not None:
            self._check_first_token(first_token_id)
            request.append_output_token(first_token_id)
        reservation = self.scheduler.reserve_remote_kv(request)
        if reservation is not None:
            self._add_output_state(request, prompt, stream)
            self._start_grammar(request)
        return reservation

    def commit_prefilled(self, request_id: str, prefill_result: PrefillResult | None = None) -> bool:
        """Decode side: the reserved blocks hold the prompt's KV; the request joins the decode batch.
        `prefill_result` supplies the first token (if not given at reservation), its logprobs and the
        prefill side's num_cached_tokens. False if the request was aborted meanwhile."""
        if prefill_result is not None and prefill_result.request_id != request_id:
            raise ValueError(f"prefill result for {prefill_result.request_id!r} committed as {request_id!r}")
        first_token_id = prefill_result.first_token_id if prefill_result is not None else None
        if first_token_id is not None:
            self._check_first_token(first_token_id)
        request = self.scheduler.commit_remote_kv(request_id, first_token_id)
        if request is None:
            return False
        # Only the prefill side's prefix cache counts; the decode side's hits never show.
        request.num_cached_tokens = prefill_result.num_cached_tokens if prefill_result is not None else 0
        logprobs = {}
        if prefill_result is not None and prefill_result.first_logprobs is not None:
            logprobs[request_id] = prefill_result.first_logprobs
        stopped = self.output_processor.update([request], logprobs)
        if stopped:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED)
        self._pending_outputs.extend(self.output_processor.make_outputs([request]))
        return True

    def _check_first_token(self, token_id: int) -> None:
        if not 0 <= token_id < self.model_args.vocab_size:
            raise ValueError(f"first token id must be in [0, {self.model_args.vocab_size}), got {token_id}")
