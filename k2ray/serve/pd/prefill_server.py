"""PrefillServer: a replica of the prefill pool (a Serve deployment), in front of a prefill-role core.

Decode replicas call it twice per request: `prefill` (streamed: the first item says which replica
took the job, so a time-out can be pinned on it; the second carries the PrefillResult) and then
`send_kv`, pinned to that replica by the request router, once the decode core has posted its
receive. The KV stays held in between, bounded by the engine's lease. Cancelling either call (the
decode side gave up) aborts the request here, freeing its blocks once no send reads them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.serve.args import ServeArgs
from k2ray.serve.engine.core_replica import CoreReplica
from k2ray.serve.engine.engine_core_protocol import CorePDConfig
from k2ray.serve.metrics.pd_metrics import PDMetrics
from k2ray.serve.pd.pd_protocol import (
    CoreCachedHashes,
    CorePrefill,
    CoreSendKV,
    KVRelease,
    KVSendOrder,
    PrefillAccepted,
    PrefillJob,
    PrefillReply,
    Sent,
)


def transfer_config(args: ServeArgs) -> KVTransferConfig:
    return KVTransferConfig(args.pd.kv_transfer_timeout_s, args.pd.kv_max_chunk_bytes)


class PrefillServer(CoreReplica):
    def __init__(self, args: ServeArgs) -> None:
        testing = args.testing
        delay_s = testing.kv_send_chunk_delay_s if testing.allow_injection else 0.0
        pd = CorePDConfig(transfer_config(args), host="", core_id=uuid.uuid4().hex, send_chunk_delay_s=delay_s)
        super().__init__(args, args.pool_engine("prefill"), "prefill", pd)
        self._allow_injection = testing.allow_injection
        self._metrics = PDMetrics("prefill")
        self._max_hashes = args.pd.affinity_max_hashes

    async def prefill(self, job: PrefillJob) -> AsyncIterator[PrefillAccepted | PrefillReply]:
        yield PrefillAccepted(self._replica_id)
        if job.stall_s and self._allow_injection:
            await asyncio.sleep(job.stall_s)
        is_over = False
        try:
            prefilled = await self._core.ask(lambda ack_id: CorePrefill(
                job.request_id, job.prompt_token_ids, job.sampling_params, ack_id))
            is_over = True
        finally:
            if not is_over:  # the decode side gave up (or the core died)
                await self._abort(job.request_id)
        if prefilled.result is not None:
            self._metrics.queued(prefilled.queue_s)
        held_by = self._core.core_id_of(job.request_id) if prefilled.result is not None else None
        yield PrefillReply(self._replica_id, prefilled, held_by)

    async def send_kv(self, order: KVSendOrder) -> Sent:
        request_id = order.meta.request_id
        is_over = False
        try:
            sent = await self._core.ask(lambda ack_id: CoreSendKV(request_id, order.meta, order.spec, ack_id))
            is_over = True
        finally:
            if not is_over:
                await self._abort(request_id)
        return sent

    async def release(self, order: KVRelease) -> None:
        await self._abort(order.request_id)

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the request routers see of this replica: its load and what its prefix cache holds."""
        stats = await self._core.stats()
        hashes = await self._core.ask(lambda ack_id: CoreCachedHashes(self._max_hashes, ack_id))
        return {"num_free_blocks": stats["num_free_blocks"], "num_running": stats["num_running"],
                "num_waiting": stats["num_waiting"], "cached_hashes": hashes}

