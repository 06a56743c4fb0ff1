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

from k2ray.serve.args import ServeArgs
from k2ray.serve.engine.core_replica import CoreReplica
from k2ray.serve.engine.engine_core_client import EngineCoreDied
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, EngineRequest

logger = logging.getLogger(__name__)


class EngineServer(CoreReplica):
    def __init__(self, args: ServeArgs) -> None:
        super().__init__(args, args.engine, "both")

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

