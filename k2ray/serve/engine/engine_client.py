"""The router's EngineClient over a Serve deployment handle to the engine pool.

Replica choice is Serve's: each `generate` call goes through the handle's request router (power of two
choices over replicas' queue lengths), and a streaming call stays on the replica that took it, so one
engine request lives on one replica. n > 1 fans out into n calls, which may land on different replicas.
Deltas that arrive while the router is busy are merged, so a loaded router sends fewer, larger chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from k2ray.serve.engine.engine_protocol import DeltaBuffer, EngineDelta, EngineOverloaded, EngineRequest


class HandleEngineClient:
    def __init__(self, handle: DeploymentHandle, transport: Literal["grpc", "object_ref"] = "grpc") -> None:
        self._handle = handle
        if transport == "grpc":
            handle = grpc_handle(handle)
        self._stream = handle.options(stream=True, method_name="generate")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        gen = self._stream.remote(request)
        buffer = DeltaBuffer()
        pump = asyncio.create_task(_pump(gen, buffer))
        done = False
        try:
            while (delta := await buffer.take()) is not None:
                done = delta.finished
                yield delta
                if done:
                    return
            await pump  # re-raises what ended the stream early (e.g. back-pressure)
        finally:
            if not done:
                # Closing early (disconnect, stop string): cancel the remote generator, whose cleanup
                # aborts the engine request and frees its blocks.
                gen.cancel()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def info(self) -> dict[str, Any]:
        return await self._handle.info.remote()


def grpc_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """Calls over Serve's inter-deployment gRPC with plain pickle (our payloads are importable
    dataclasses): far less CPU per call and per streamed item than one Ray object each."""
    return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")


async def _pump(gen: DeploymentResponseGenerator, buffer: DeltaBuffer) -> None:
    try:
        async for delta in gen:
            buffer.put(delta)
    except (BackPressureError, DeploymentUnavailableError) as exc:
        raise EngineOverloaded(str(exc)) from None
    finally:
        buffer.close()
