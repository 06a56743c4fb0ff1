"""The router's EngineClient over a Serve deployment handle to the engine pool.

Replica choice is Serve's: each `generate` call goes through the handle's request router (power of two
choices over replicas' queue lengths), and a streaming call stays on the replica that took it, so one
engine request lives on one replica. n > 1 fans out into n calls, which may land on different replicas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from k2ray.serve.engine_protocol import EngineDelta, EngineOverloaded, EngineRequest


class HandleEngineClient:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True, method_name="generate")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        gen = self._stream.remote(request)
        done = False
        try:
            async for delta in gen:
                done = delta.finished
                yield delta
        except (BackPressureError, DeploymentUnavailableError) as exc:
            done = True
            raise EngineOverloaded(str(exc)) from None
        finally:
            if not done:
                # Closing early (disconnect, stop string): cancel the remote generator, whose cleanup
                # aborts the engine request and frees its blocks.
                gen.cancel()

    async def ready(self) -> bool:
        await self._handle.info.remote()
        return True

    async def info(self) -> dict[str, Any]:
        return await self._handle.info.remote()
