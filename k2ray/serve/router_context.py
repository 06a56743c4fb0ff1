"""What every API handler needs: tokenizer, template, the engine client, limits, admission control,
and the shared steps (parse a body, check the model, start the choices, map engine failures)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.openai_protocol import TestInjection
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.sampling_params import SamplingParams
from k2ray.serve.engine_protocol import (
    EngineClient,
    EngineFailure,
    EngineOverloaded,
    EngineRequest,
    Injection,
)
from k2ray.serve.errors import (
    ApiError,
    from_validation_error,
    internal_error,
    invalid_request,
    model_not_found,
)
from k2ray.serve.errors import overloaded as overloaded_error
from k2ray.serve.generation import ChoiceDecoder, ChoiceEvent, merge_choices, run_choice
from k2ray.serve.sse import ClosingStreamingResponse

RequestT = TypeVar("RequestT", bound=BaseModel)


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.inflight -= 1
            self._admission = None


@dataclass
class Admission:
    """Bounded in-flight requests per router replica; beyond the bound a request is refused at once
    (429 + Retry-After) instead of queueing behind work the engines cannot absorb."""

    max_inflight: int
    retry_after_s: int
    inflight: int = 0

    def admit(self) -> Ticket:
        if self.inflight >= self.max_inflight:
            raise overloaded_error(self.retry_after_s)
        self.inflight += 1
        return Ticket(self)


@dataclass
class RouterContext:
    tokenizer: K2Tokenizer
    template: ChatTemplate
    engine: EngineClient
    model_name: str
    max_model_len: int
    admission: Admission
    allow_injection: bool = False
    created: int = 0

    def parse(self, model: type[RequestT], body: bytes) -> RequestT:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise model_not_found(name)

    def injection(self, test: TestInjection | None) -> Injection | None:
        if test is None:
            return None
        if not self.allow_injection:
            raise invalid_request("k2ray_test is only accepted by test deployments", param="k2ray_test")
        script = None if test.script is None else tuple(self.tokenizer.encode(test.script))
        return Injection(script, test.token_delay_s, test.fail_after_tokens)

    def default_stop_token_ids(self, params: SamplingParams) -> list[int]:
        return [] if params.ignore_eos else list(self.tokenizer.stop_token_ids)


def new_request_id(prefix: str) -> str:
    """`prefix` carries its separator: `chatcmpl-`, `cmpl-` (OpenAI), `msg_` (Anthropic)."""
    return f"{prefix}{uuid.uuid4().hex}"


def failure_to_error(failure: EngineFailure) -> ApiError:
    if failure.kind == "rejected":
        return invalid_request(failure.message)
    return internal_error()


@dataclass
class StartedChoices:
    """Choices whose first event has arrived (so errors before any output still get a status code)."""

    first: ChoiceEvent
    rest: AsyncIterator[ChoiceEvent]

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        yield self.first
        async for event in self.rest:
            yield event

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still running in a task being cancelled; it closes itself
            pass


async def start_choices(ctx: RouterContext, requests: list[EngineRequest], decoders: list[ChoiceDecoder],
                        prefill_text: str = "") -> StartedChoices:
    streams = [run_choice(ctx.engine, r, d, d.prime(prefill_text)) for r, d in zip(requests, decoders, strict=True)]
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
    """Stop strings are applied by the router (it owns detokenization), so only stop token ids go down."""
    try:
        params = SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=top_k, min_p=min_p or 0.0, seed=seed,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, max_tokens=max_tokens, min_tokens=min_tokens,
            ignore_eos=ignore_eos, logprobs=logprobs, skip_special_tokens=False,
        )
    except ValueError as exc:
        raise invalid_request(str(exc)) from None
    params.stop_token_ids = ctx.default_stop_token_ids(params)
    return params


async def dispatch(ctx: RouterContext, requests: list[EngineRequest], decoders: list[ChoiceDecoder], *,
                   prefill_text: str, stream: bool,
                   collect: Callable[[StartedChoices], Awaitable[Response]],
                   stream_body: Callable[[StartedChoices], AsyncIterator[str]]) -> Response:
    """Admit, start the choices, then either collect one response or stream; every exit path releases
    the admission slot and closes the engine streams (which aborts unfinished engine requests)."""
    ticket = ctx.admission.admit()
    try:
        started = await start_choices(ctx, requests, decoders, prefill_text)
    except BaseException:
        ticket.release()
        raise
    if not stream:
        try:
            return await collect(started)
        finally:
            await started.aclose()
            ticket.release()

    async def on_close() -> None:
        await started.aclose()
        ticket.release()

    return ClosingStreamingResponse(stream_body(started), on_close)
