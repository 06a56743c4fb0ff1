"""EngineServer: the engine deployment's class, a plain class in front of an engine core process.

The engine itself (LLMEngine's step loop, token ids only: the router owns tokenizer, stop strings and
parsers) runs in its own process, `engine_core.py`, so it never shares a GIL with Serve's request
handling. `submit` forwards a request there; the core sends its `EngineDelta`s straight to the router
replica's delta channel (one frame per engine step per router) and the call returns when the request
is over. `generate` instead streams the deltas back through the Serve handle. Either way, when the
caller goes away (client disconnect, stop string matched in the router) Serve cancels the call and
the request is aborted at once, freeing its KV blocks. Test-only injection (a scripted token stream,
or a failure after N tokens) travels with the request to the core, which honours it only when the
deployment was built with `testing.allow_injection` (see `test_hooks.py`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import fields

from k2ray.engine.config import EngineConfig
from k2ray.serve.args import ServeArgs
from k2ray.serve.engine.engine_core_client import EngineCoreClient, EngineCoreDied
from k2ray.serve.engine.engine_core_protocol import CoreConfig
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, EngineRequest

logger = logging.getLogger(__name__)


def engine_config(args: ServeArgs) -> EngineConfig:
    """EngineConfig from ServeArgs.engine; None values keep the engine's defaults."""
    known = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in args.engine.model_dump().items() if k in known and v is not None}
    return EngineConfig(model=args.model_dir, skip_tokenizer_init=True, **values)


class EngineServer:
    def __init__(self, args: ServeArgs) -> None:
        config = CoreConfig(engine_config(args), args.engine.stream_interval, args.engine.torch_threads,
                            args.testing.allow_injection)
        self._core = EngineCoreClient(config, args.engine.core_startup_timeout_s)

    async def info(self) -> dict[str, int]:
        """Runtime facts the router needs (resolved once the engine is built)."""
        return {"max_model_len": self._core.max_model_len}

    async def stats(self) -> dict[str, int]:
        return await self._core.stats()

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine core died is replaced."""
        if not self._core.is_alive:
            raise EngineCoreDied("the engine core process is not running")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """The request's deltas as this Serve call's own stream."""
        deltas = self._deltas(request)
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()

    async def submit(self, request: EngineRequest) -> None:
        """Run the request, its deltas going over the delta channel to `request.reply_to`; returns once
        the final delta is sent. Cancelling the call (the router gave up) aborts the request."""
        if request.reply_to is None:
            raise ValueError("submit needs a reply address (generate streams without one)")
        is_over = False
        try:
            await self._core.run_on_channel(request)
            is_over = True
        finally:
            if not is_over:  # cancelled (the router gave up) or the core died
                self._core.forget(request.request_id)
                await self._abort(request.request_id)

    async def _deltas(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Deltas of one request streamed back from the core."""
        try:
            buffer = self._core.stream(request)
        except EngineCoreDied as exc:
            yield EngineDelta(failure=EngineFailure("internal", str(exc)))
            return
        is_over = False
        try:
            while (delta := await buffer.take()) is not None:
                is_over = delta.finished
                yield delta
                if is_over:
                    return
        finally:
            if not is_over:
                self._core.forget(request.request_id)
                await self._abort(request.request_id)

    async def _abort(self, request_id: str) -> None:
        if self._core.is_alive:
            try:
                await self._core.abort(request_id)
            except EngineCoreDied:
                pass  # gone with its requests and their blocks

    def shutdown(self) -> None:
        """Stop the engine core. Serve calls it through __del__ when the replica goes."""
        core = getattr(self, "_core", None)
        if core is not None:
            core.shutdown()

    def __del__(self) -> None:
        self.shutdown()
