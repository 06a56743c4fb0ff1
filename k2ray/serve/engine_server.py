"""EngineServer: the engine deployment's class, a plain class over `AsyncLLMEngine` (token ids only).

The engine is built with `skip_tokenizer_init=True`: the router owns tokenizer, stop strings and
parsers. `submit` runs a request and sends its `EngineDelta`s over the delta channel to the router
replica that asked (one connection per router, one frame per engine step); `generate` instead streams
them back through the Serve handle. Either way, when the caller goes away (client disconnect, stop
string matched in the router) Serve cancels the call and the engine request is aborted at once,
freeing its KV blocks. Test-only injection (a scripted token stream, or a
failure after N tokens) is honoured only when the deployment was built with `testing.allow_injection`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, fields

import torch

from k2ray.engine.async_engine import AsyncLLMEngine
from k2ray.engine.config import EngineConfig
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.args import ServeArgs
from k2ray.serve.channel_sink import ChannelSink, failure_of, to_delta
from k2ray.serve.delta_sender import DeltaLink, DeltaSender, LinkBroken
from k2ray.serve.engine_protocol import EngineDelta, EngineFailure, EngineRequest, Injection, ReplyAddress

logger = logging.getLogger(__name__)

INJECTED_FAILURE_MESSAGE = "injected engine failure"


def engine_config(args: ServeArgs) -> EngineConfig:
    """EngineConfig from ServeArgs.engine; None values keep the engine's defaults."""
    known = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in args.engine.model_dump().items() if k in known and v is not None}
    return EngineConfig(model=args.model_dir, skip_tokenizer_init=True, **values)


class EngineServer:
    def __init__(self, args: ServeArgs) -> None:
        # Replicas share a few cores: each gets an explicit intra-op thread budget.
        torch.set_num_threads(args.engine.torch_threads)
        self._allow_injection = args.testing.allow_injection
        self._stream_interval = args.engine.stream_interval
        self._engine = AsyncLLMEngine(engine_config(args))
        self._sender = DeltaSender()
        self._sinks: dict[ReplyAddress, ChannelSink] = {}  # one per router replica's current link

    async def info(self) -> dict[str, int]:
        """Runtime facts the router needs (resolved once the engine is built)."""
        engine = self._engine.engine
        capacity = engine.kv_cache_manager.num_total_blocks * engine.kv_cache_manager.block_size
        return {"max_model_len": min(engine.max_model_len, capacity)}

    async def stats(self) -> dict[str, int]:
        return asdict(self._engine.get_stats())

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """The request's deltas as this Serve call's own stream."""
        deltas = self._deltas(request)
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()

    async def submit(self, request: EngineRequest) -> None:
        """Run the request, streaming its deltas over the delta channel to `request.reply_to`; returns
        once the final delta is sent. Cancelling the call (the router gave up) aborts the request."""
        assert request.reply_to is not None, "submit needs a reply address"
        try:
            link = await self._sender.link(request.reply_to)
            if request.injection is not None and self._allow_injection:
                await self._submit_streamed(request, link)
            else:
                await self._submit_to_sink(request, link)
        except LinkBroken:
            logger.warning("request %s: router unreachable, aborted", request.request_id)

    async def _submit_to_sink(self, request: EngineRequest, link: DeltaLink) -> None:
        """The serving path: the engine thread writes the request's deltas onto the link's sink."""
        sink = self._sinks.get(request.reply_to)
        if sink is None or sink.link is not link:  # first request from this router, or a new connection
            sink = self._sinks[request.reply_to] = ChannelSink(link, self._stream_interval)
        request_id = request.request_id
        finished = sink.expect(request_id)
        try:
            self._engine.add_request_to_sink(request_id, request.prompt_token_ids, request.sampling_params, sink)
        except Exception as exc:  # rejected (too long, bad schema) or invalid before it reached the engine
            if not isinstance(exc, RequestRejected):
                logger.exception("engine failure on request %s", request_id)
            sink.forget(request_id)
            link.send(request_id, EngineDelta(failure=failure_of(exc)))
            return
        is_sent = False
        try:
            await finished
            is_sent = True
        finally:
            if not is_sent:  # cancelled (the router gave up) or the router went away (LinkBroken)
                sink.forget(request_id)
                await self._abort(request_id)

    async def _submit_streamed(self, request: EngineRequest, link: DeltaLink) -> None:
        """Per-request async path (test injections): each delta is sent as it comes."""
        deltas = self._deltas(request)
        try:
            async for delta in deltas:
                link.send(request.request_id, delta)
        finally:
            await deltas.aclose()

    async def _deltas(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Engine deltas of one request, `stream_interval` applied; an early close aborts it."""
        injection = request.injection if self._allow_injection else None
        if injection is not None and injection.script_token_ids is not None:
            async for delta in self._replay(request, injection):
                yield delta
            return
        fail_after = injection.fail_after_tokens if injection is not None else None
        # AsyncLLMEngine already merges whatever piled up while this generator was blocked on a slow
        # consumer, so no pump task is needed: deltas go out as they come, the first at once (TTFT),
        # later ones once they hold `stream_interval` tokens.
        outputs = self._outputs(request)
        pending: EngineDelta | None = None
        finished = False
        num_tokens = 0
        try:
            async for delta in outputs:
                if pending is not None:
                    pending.merge(delta)
                    delta = pending
                if not delta.finished and num_tokens and len(delta.token_ids) < self._stream_interval:
                    pending = delta
                    continue
                pending = None
                num_tokens += len(delta.token_ids)
                if fail_after is not None and num_tokens >= fail_after and not delta.finished:
                    yield EngineDelta(failure=EngineFailure("internal", INJECTED_FAILURE_MESSAGE))
                    return
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            await outputs.aclose()
            if not finished:
                await self._abort(request.request_id)

    async def _outputs(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Engine outputs as EngineDeltas; a failure ends the stream as a failure delta."""
        try:
            async for out in self._engine.add_request(request.request_id, request.prompt_token_ids,
                                                      request.sampling_params):
                yield to_delta(out)
        except Exception as exc:  # the engine finished (and freed) the request when it raised
            if not isinstance(exc, RequestRejected):
                logger.exception("engine failure on request %s", request.request_id)
            yield EngineDelta(failure=failure_of(exc))

    async def _abort(self, request_id: str) -> None:
        result = self._engine.abort(request_id)
        if inspect.isawaitable(result):
            await result

    async def _replay(self, request: EngineRequest, injection: Injection) -> AsyncIterator[EngineDelta]:
        params = request.sampling_params
        stop_ids = set(params.stop_token_ids)
        budget = params.max_tokens or len(injection.script_token_ids or ())
        for i, token_id in enumerate(injection.script_token_ids or ()):
            if injection.token_delay_s:
                await asyncio.sleep(injection.token_delay_s)
            if injection.fail_after_tokens is not None and i >= injection.fail_after_tokens:
                yield EngineDelta(failure=EngineFailure("internal", INJECTED_FAILURE_MESSAGE))
                return
            finish = "stop" if token_id in stop_ids else ("length" if i + 1 >= budget else None)
            yield EngineDelta([token_id], finish_reason=finish)
            if finish is not None:
                return
        yield EngineDelta(finish_reason="stop")

    def shutdown(self) -> None:
        """Stop the engine loop; running requests end with an engine error. Serve calls it via __del__."""
        shutdown = getattr(getattr(self, "_engine", None), "shutdown", None)
        if shutdown is not None and not inspect.iscoroutinefunction(shutdown):
            shutdown()

    def __del__(self) -> None:
        self.shutdown()
