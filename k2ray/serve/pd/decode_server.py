"""DecodeServer: a replica of the decode pool, the orchestrator of disaggregated serving.

The router submits requests here as it does to a colocated EngineServer. The decode core looks the
prompt up in its own prefix cache and reserves blocks; a short miss is prefilled right here
(conditional disaggregation), anything longer by the prefill pool (`RemotePrefill`), whose KV lands
in the reserved blocks; then the core decodes with continuous batching and its deltas go to the
router over the delta channel. However the call ends (done, cancelled by the router, failed), the
request ends in the core: receives are cancelled before blocks are freed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray

from k2ray.serve.args import ServeArgs
from k2ray.serve.engine.core_replica import CoreReplica
from k2ray.serve.engine.engine_core_client import EngineCoreDied, core_add
from k2ray.serve.engine.engine_core_protocol import CorePDConfig
from k2ray.serve.engine.engine_protocol import EngineFailure, EngineRequest
from k2ray.serve.engine.engine_server import EngineServer
from k2ray.serve.metrics.pd_metrics import PDMetrics
from k2ray.serve.pd.pd_protocol import CoreReserve, Reserved
from k2ray.serve.pd.prefill_server import transfer_config
from k2ray.serve.pd.remote_prefill import PrefillRejected, PrefillUnavailable, RemotePrefill


class DecodeServer(EngineServer):
    def __init__(self, args: ServeArgs, prefill_pool) -> None:  # not super().__init__: that starts a colocated core
        host = args.pd.kv_host or ray.util.get_node_ip_address()
        pd = CorePDConfig(transfer_config(args), host, uuid.uuid4().hex)
        CoreReplica.__init__(self, args, args.pool_engine("decode"), "decode", pd)
        self._threshold = args.pd.local_prefill_threshold
        self._metrics = PDMetrics("decode")
        self._remote = RemotePrefill(prefill_pool, self._core, args.pd, self._metrics.prefill_retry)

    async def submit(self, request: EngineRequest) -> None:
        if request.reply_to is None:
            raise ValueError("a decode replica streams over the delta channel: submit needs a reply address")
        request_id = request.request_id
        done = self._core.track(request_id)
        is_over = False
        try:
            start = time.perf_counter()
            reserved: Reserved = await self._core.ask(lambda ack_id: CoreReserve(
                core_add(request, request.reply_to), self._threshold, ack_id))
            self._metrics.queued(time.perf_counter() - start)  # waiting for free blocks
            if reserved.is_local:
                self._metrics.local_prefill()
            else:
                await self._prefill_remotely(request, reserved)
            await done
            is_over = True
        finally:
            if not is_over:  # cancelled (the router gave up) or the core died
                self._core.forget(request_id)
                await self._abort(request_id)

    async def _prefill_remotely(self, request: EngineRequest, reserved: Reserved) -> None:
        try:
            outcome = await self._remote.run(request, reserved.meta)
            if outcome.landed.stats is not None:
                self._metrics.kv_transferred(outcome.landed.stats.num_bytes, outcome.landed.stats.seconds)
        except PrefillRejected as exc:
            await self._end(request.request_id, EngineFailure("rejected", str(exc)))
        except PrefillUnavailable as exc:
            await self._end(request.request_id, EngineFailure("unavailable", str(exc)))

    async def _end(self, request_id: str, failure: EngineFailure) -> None:
        """Fail the request in the core: its blocks are freed and the router gets the error."""
        try:
            await self._core.abort(request_id, failure)
        except EngineCoreDied:
            pass  # the router hears the core is gone from its channel

    async def record_routing_stats(self) -> dict[str, Any]:
        stats = await self._core.stats()
        return {"num_free_blocks": stats["num_free_blocks"], "num_running": stats["num_running"],
                "num_waiting": stats["num_waiting"] + stats["num_waiting_for_blocks"]}
