"""The router's EngineClient over the delta channel: requests go through the Serve handle (its replica
choice, queue bound and cancellation), their token deltas come back over this replica's
`DeltaReceiver`, one frame per engine step for all of this router's requests on that engine.

The Serve call `EngineServer.submit` stays open until its request ends, so Serve's view of each
engine replica's load stays exact, and cancelling it aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from k2ray.serve.channel.delta_receiver import DeltaReceiver
from k2ray.serve.engine.engine_client import grpc_handle
from k2ray.serve.engine.engine_protocol import (
    DeltaBuffer,
    EngineDelta,
    EngineFailure,
    EngineOverloaded,
    EngineRequest,
)

# After `submit` returned, how long its final delta may still be in flight on the channel.
FINAL_DELTA_GRACE_S = 5.0
ENDED_EARLY = "the engine call ended before its final delta arrived"


class ChannelEngineClient:
    def __init__(self, handle: DeploymentHandle, receiver: DeltaReceiver) -> None:
        self._handle = handle
        self._submit = grpc_handle(handle).options(method_name="submit")
        self._receiver = receiver
        self._watchers: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        # Started on first use, so it listens on the event loop that serves the requests.
        await self._receiver.start()
        buffer, reply_to = self._receiver.open(request.request_id)
        response = self._submit.remote(replace(request, reply_to=reply_to))
        watcher = asyncio.ensure_future(_watch(response, buffer))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        done = False
        try:
            while (delta := await buffer.take()) is not None:
                done = delta.finished
                yield delta
                if done:
                    return
        finally:
            self._receiver.discard(request.request_id)
            if not done:
                response.cancel()  # the engine replica aborts the request and frees its blocks

    async def info(self) -> dict[str, Any]:
        return await self._handle.info.remote()


async def _watch(response: DeploymentResponse, buffer: DeltaBuffer) -> None:
    """End the buffer when the Serve call ends without the channel having delivered a final delta."""
    try:
        await response
    except (BackPressureError, DeploymentUnavailableError) as exc:
        buffer.close(EngineOverloaded(str(exc)))
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the replica died or raised: the request is gone with it
        buffer.put(EngineDelta(failure=EngineFailure("internal", f"engine call failed: {type(exc).__name__}")))
        return
    if not buffer.finished:
        await asyncio.sleep(FINAL_DELTA_GRACE_S)
        buffer.put(EngineDelta(failure=EngineFailure("internal", ENDED_EARLY)))
