"""What every API handler needs: tokenizer, template, the engine client, limits, admission control,
and the shared steps (parse a body, check the model, start the choices, map engine failures)."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import RequestStatus
from k2ray.sampling_params import SamplingParams
from k2ray.serve.args import RequestLimits, ServedModel
from k2ray.serve.engine.engine_protocol import (
    EngineClient,
    EngineFailure,
    EngineOverloaded,
    EngineRequest,
)
from k2ray.serve.http.auth import ANONYMOUS, AdminGuard, Authenticator, Caller
from k2ray.serve.http.errors import (
    ApiError,
    internal_error,
    invalid_request,
    model_not_found,
    unavailable,
    without_native_sources,
)
from k2ray.serve.http.errors import overloaded as overloaded_error
from k2ray.serve.http.generation import ChoiceDecoder, ChoiceEvent, merge_choices, run_choice
from k2ray.serve.http.metering import Billing, RequestMeter, UnmeteredRequest, UsageFn
from k2ray.serve.http.request_limits import check_fan_out, check_json_depth
from k2ray.serve.http.sse import ClosingStreamingResponse
from k2ray.serve.http.validation_errors import from_validation_error
from k2ray.serve.metrics.router_metrics import CANCELLED_FINISH, CLIENT_CLOSED_STATUS, ERROR_FINISH

if TYPE_CHECKING:
    from k2ray.serve.metrics import RequestObservation, RouterMetrics
    from k2ray.serve.test_hooks import Injection
    from k2ray.tools import WebSearch

RequestT = TypeVar("RequestT", bound=BaseModel)
ResultT = TypeVar("ResultT")


class Ticket:
    """One admitted HTTP request holding `num_requests` engine requests; `release` is idempotent so every
    exit path may call it."""

    def __init__(self, admission: Admission, num_requests: int) -> None:
        self._admission: Admission | None = admission
        self._num_requests = num_requests

    def release(self) -> None:
        if self._admission is not None:
            self._admission.inflight -= self._num_requests
            self._admission = None


@dataclass
class Admission:
    """Bounded in-flight engine requests per router replica (an HTTP request with n choices holds n);
    beyond the bound a request is refused at once (429 + Retry-After) instead of queueing behind work the
    engines cannot absorb."""

    max_inflight: int
    retry_after_s: int
    inflight: int = 0

    def admit(self, num_requests: int) -> Ticket:
        if self.inflight + num_requests > self.max_inflight:
            raise overloaded_error(self.retry_after_s)
        self.inflight += num_requests
        return Ticket(self, num_requests)


@dataclass
class RouterContext:
    tokenizer: K2Tokenizer
    template: ChatTemplate
    engine: EngineClient
    models: tuple[ServedModel, ...]  # the served variants; the first is the primary
    max_model_len: int
    admission: Admission
    allow_injection: bool = False
    created: int = 0
    limits: RequestLimits = field(default_factory=RequestLimits)
    billing: Billing | None = None  # None: nothing is metered or limited per key
    auth: Authenticator = field(default_factory=lambda: Authenticator(None, 0.0))
    admin: AdminGuard = field(default_factory=lambda: AdminGuard(None))
    web_search: WebSearch | None = None  # `$web_search` / `web_search_20250305`; None: refused with a 400
    caller: Caller = ANONYMOUS  # set per request by `for_caller`
    # The request's variant (model id, plan, priority), set on the per-request context by `check_model`.
    served_model: ServedModel | None = None
    metrics: RouterMetrics | None = None  # None: no metrics (unit tests without Ray)
    # This request's metrics, set per request by the route from `metrics`.
    observation: RequestObservation | None = None
    _prepare_pool: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._prepare_pool = ThreadPoolExecutor(self.limits.num_prepare_threads, thread_name_prefix="k2ray-prepare")

    def for_caller(self, caller: Caller) -> RouterContext:
        """This context for one request's caller (a shallow copy: pools and clients are shared)."""
        scoped = copy.copy(self)
        scoped.caller = caller
        return scoped

    def meter(self, request_id: str, usage: UsageFn) -> RequestMeter | UnmeteredRequest:
        if self.billing is None:
            return UnmeteredRequest()
        return RequestMeter(self.billing, self.caller, request_id, self.variant.id, self.variant.plan, usage)

    async def off_loop(self, num_bytes: int, fn: Callable[..., ResultT], *args: Any) -> ResultT:
        """`fn(*args)` (parsing, rendering, tokenizing a body of `num_bytes`): inline when small, on the
        prepare pool from `limits.offload_min_bytes` on, so a huge prompt does not stall other streams."""
        if num_bytes < self.limits.offload_min_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    def parse(self, model: type[RequestT], body: bytes) -> RequestT:
        check_json_depth(body, self.limits.max_json_depth)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation_error(exc, model) from None

    def check_fan_out(self, num_prompts: int, n: int) -> None:
        check_fan_out(self.limits, num_prompts, n, self.admission.max_inflight)

    @property
    def variant(self) -> ServedModel:
        """The request's variant once `check_model` has passed, else the primary."""
        return self.served_model or self.models[0]

    @property
    def model_name(self) -> str:
        return self.variant.id

    def check_model(self, name: str) -> ServedModel:
        """The variant serving `name` (404 if none), kept as this request's `served_model`."""
        for served in self.models:
            if served.id == name:
                self.served_model = served
                if self.observation is not None:
                    self.observation.model = served.id
                return served
        raise model_not_found(name)

    def injection(self, raw: dict[str, Any] | None) -> Injection | None:
        """The request's test hook (`k2ray_test`): a 400 unless the deployment allows injection."""
        if raw is None:
            return None
        if not self.allow_injection:
            raise invalid_request("k2ray_test is only accepted by test deployments", param="k2ray_test")
        from k2ray.serve import test_hooks  # fenced: loaded only where injection is allowed

        try:
            return test_hooks.parse_injection(raw, self.tokenizer)
        except ValidationError as exc:
            raise invalid_request(test_hooks.validation_message(exc), param="k2ray_test") from None

    def default_stop_token_ids(self, params: SamplingParams) -> list[int]:
        return [] if params.ignore_eos else list(self.tokenizer.stop_token_ids)


def new_request_id(prefix: str) -> str:
    """`prefix` carries its separator: `chatcmpl-`, `cmpl-` (OpenAI), `msg_` (Anthropic)."""
    return f"{prefix}{uuid.uuid4().hex}"


def failure_to_error(failure: EngineFailure) -> ApiError:
    if failure.kind == "rejected":
        return invalid_request(without_native_sources(failure.message))
    if failure.kind == "unavailable":
        return unavailable(failure.message)
    return internal_error()


@dataclass
class StartedChoices:
    """Choices whose first event has arrived (so errors before any output still get a status code)."""

    first: ChoiceEvent
    rest: AsyncIterator[ChoiceEvent]
    has_failed: bool = False  # an engine failure came through

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        yield self.first
        async for event in self.rest:
            self.has_failed = self.has_failed or event.failure is not None
            yield event

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still running in a task being cancelled; it closes itself
            pass


async def start_choices(ctx: RouterContext, requests: list[EngineRequest],
                        decoders: list[ChoiceDecoder]) -> StartedChoices:
    timers = [ctx.observation.choice_timer() if ctx.observation else None for _ in requests]
    streams = [run_choice(ctx.engine, r, d, t) for r, d, t in zip(requests, decoders, timers, strict=True)]
    merged = merge_choices(streams)
    try:
        first = await anext(merged)
    except StopAsyncIteration:
        raise internal_error() from None
    except EngineOverloaded:
        await merged.aclose()
        raise overloaded_error(ctx.admission.retry_after_s) from None
    except ApiError:
        await merged.aclose()
        raise
    except Exception:
        await merged.aclose()
        raise internal_error() from None
    if first.failure is not None:
        await merged.aclose()
        raise failure_to_error(first.failure)
    return StartedChoices(first, merged)


def base_sampling_params(ctx: RouterContext, *, temperature: float | None, top_p: float | None,
                         top_k: int | None, min_p: float | None, seed: int | None, max_tokens: int,
                         logprobs: int | None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                         repetition_penalty: float = 1.0, min_tokens: int = 0,
                         ignore_eos: bool = False) -> SamplingParams:
    """Stop strings are applied by the router (it owns detokenization), so only stop token ids go down;
    the engine schedules the request at its variant's priority."""
    try:
        params = SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=top_k, min_p=min_p or 0.0, seed=seed,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, max_tokens=max_tokens, min_tokens=min_tokens,
            ignore_eos=ignore_eos, logprobs=logprobs, skip_special_tokens=False,
            priority=ctx.variant.priority,
        )
    except ValueError as exc:
        raise invalid_request(str(exc)) from None
    params.stop_token_ids = ctx.default_stop_token_ids(params)
    return params


StartFn = Callable[[RouterContext, list[EngineRequest], list[ChoiceDecoder]], Awaitable[StartedChoices]]


async def dispatch(ctx: RouterContext, requests: list[EngineRequest], decoders: list[ChoiceDecoder], *,
                   stream: bool,
                   collect: Callable[[StartedChoices], Awaitable[Response]],
                   stream_body: Callable[[StartedChoices], AsyncIterator[str]],
                   request_id: str, usage: UsageFn, start: StartFn | None = None,
                   num_max_searches: int = 0) -> Response:
    """Admit (this replica's bound, then the key's shared limits), start the choices, then either collect
    one response or stream; every exit path releases the admission slot, closes the engine streams (which
    aborts unfinished engine requests) and records the request's usage (`usage`: what the client gets).
    `start` (default `start_choices`) may wrap the choices, as the server-side search loop does; the
    admission reserves `num_max_searches` searches' price too."""
    ticket = ctx.admission.admit(len(requests))
    meter = ctx.meter(request_id, usage)
    try:
        num_max_completion = sum(r.sampling_params.max_tokens for r in requests)
        await meter.admit(usage().num_prompt_tokens + num_max_completion, num_max_completion, num_max_searches)
        started = await (start or start_choices)(ctx, requests, decoders)
    except BaseException:
        ticket.release()
        meter.finish(RequestStatus.FAILED, is_delivered=False)
        raise
    if not stream:
        status = RequestStatus.FAILED
        try:
            response = await collect(started)
            status = RequestStatus.OK
        except asyncio.CancelledError:
            status = RequestStatus.CANCELLED
            _observe_finish(ctx, status, CLIENT_CLOSED_STATUS, usage)
            raise
        finally:
            await started.aclose()
            ticket.release()
            meter.finish(status, is_delivered=status is RequestStatus.OK)  # an error response delivers nothing
        _observe_finish(ctx, status, 200, usage)
        response.headers.update(meter.headers)
        return response

    is_complete = False

    async def body() -> AsyncIterator[str]:
        nonlocal is_complete
        async for frames in stream_body(started):
            yield frames
        is_complete = True

    async def on_close() -> None:
        await started.aclose()
        ticket.release()
        # A stream the client left is billed for what it was sent; a failed one too (nothing before output).
        status = RequestStatus.OK if is_complete else RequestStatus.CANCELLED
        status = RequestStatus.FAILED if started.has_failed else status
        meter.finish(status)
        _observe_finish(ctx, status, 200, usage)  # a stream's status went out with its first byte

    response = ClosingStreamingResponse(body(), on_close)
    response.headers.update(meter.headers)
    return response


def _observe_finish(ctx: RouterContext, status: RequestStatus, http_status: int | str, usage: UsageFn) -> None:
    """The request's metrics: errors and cancellations by name, else what its choices reported."""
    if ctx.observation is None or ctx.observation.is_finished:
        return
    reason = {RequestStatus.FAILED: ERROR_FINISH, RequestStatus.CANCELLED: CANCELLED_FINISH}.get(status)
    try:
        counts = usage()
    except ValueError:  # logged by the meter; the request still counts
        counts = None
    ctx.observation.finish(http_status, reason, counts)
