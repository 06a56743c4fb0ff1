"""How a decode replica gets a prompt's KV from the prefill pool: choose, prefill, receive, commit.

One attempt: the prefill pool's request router picks a replica by prefix affinity; it prefills and
holds the KV; this replica's decode core posts the receive on the pair with that replica; the send
order, pinned to it, pushes exactly the blocks the decode side lacks; the decode core commits them
and starts decoding. A replica that dies, times out or fails the transfer is excluded and the next
attempt goes elsewhere (`pd.prefill_retries`); after the last one the request fails as unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ray.exceptions import RayError

from k2ray.dist.kv_wire import KVTransferMeta
from k2ray.serve.engine.engine_core_client import EngineCoreClient
from k2ray.serve.engine.engine_protocol import EngineRequest
from k2ray.serve.pd.pd_args import PDArgs
from k2ray.serve.pd.pd_protocol import (
    CoreCancelReceive,
    CoreCommit,
    CoreExpect,
    KVRelease,
    KVSendOrder,
    Landed,
    PrefillAccepted,
    PrefillJob,
    PrefillReply,
)
from k2ray.serve.pd.prefix_hashes import prompt_block_hashes

logger = logging.getLogger(__name__)


class PrefillUnavailable(RuntimeError):
    """No prefill replica could serve the request within its attempts."""


class PrefillRejected(ValueError):
    """The prefill engine refused the request itself (retrying elsewhere cannot help)."""


class AttemptFailed(RuntimeError):
    def __init__(self, replica_id: str | None, message: str) -> None:
        super().__init__(message)
        self.replica_id = replica_id


@dataclass
class TransferOutcome:
    """What a successful remote prefill moved, for the replica's metrics."""

    num_attempts: int
    landed: Landed
    seconds: float


class RemotePrefill:
    def __init__(self, prefill_pool, core: EngineCoreClient, pd: PDArgs, on_retry: Callable[[], None]) -> None:
        self._on_retry = on_retry
        self._stream = prefill_pool.options(stream=True).prefill
        self._pool = prefill_pool
        self._core = core
        self._pd = pd

    async def run(self, request: EngineRequest, meta: KVTransferMeta) -> TransferOutcome:
        stall_s = request.injection.prefill_stall_s if request.injection is not None else 0.0
        job = PrefillJob(request.request_id, request.prompt_token_ids, request.sampling_params,
                         prompt_block_hashes(request.prompt_token_ids, self._core.block_size), stall_s=stall_s)
        errors = []
        for attempt in range(1, self._pd.prefill_retries + 2):
            start = time.perf_counter()
            try:
                landed = await self._attempt(job, meta)
                return TransferOutcome(attempt, landed, time.perf_counter() - start)
            except AttemptFailed as exc:
                errors.append(str(exc))
                logger.warning("prefill attempt %d of %s failed: %s", attempt, request.request_id, exc)
                await self._core.ask(lambda ack_id: CoreCancelReceive(request.request_id, ack_id))
                if attempt <= self._pd.prefill_retries:
                    self._on_retry()
                if exc.replica_id is not None:
                    job = replace(job, excluded_replica_ids=(*job.excluded_replica_ids, exc.replica_id))
        raise PrefillUnavailable(f"No prefill replica could serve the request ({len(errors)} attempts); "
                                 "please try again later")

    async def _attempt(self, job: PrefillJob, meta: KVTransferMeta) -> Landed:
        reply = await self._prefill(job)
        if reply.prefilled.result is None:
            if reply.prefilled.is_rejected:
                raise PrefillRejected(reply.prefilled.error)
            raise AttemptFailed(reply.replica_id, f"prefill failed: {reply.prefilled.error}")
        try:
            return await self._transfer(job, meta, reply)
        except BaseException:
            self._release(reply.replica_id, job.request_id)
            raise

    async def _prefill(self, job: PrefillJob) -> PrefillReply:
        """Run the job; its first item names the replica, so a stall is pinned on it."""
        replica_id = None
        stream = self._stream.remote(job)
        try:
            async with asyncio.timeout(self._pd.prefill_timeout_s):
                async for item in stream:
                    if isinstance(item, PrefillAccepted):
                        replica_id = item.replica_id
                    elif isinstance(item, PrefillReply):
                        return item
        except asyncio.TimeoutError:
            raise AttemptFailed(replica_id, f"no prefill within {self._pd.prefill_timeout_s:g} s") from None
        except RayError as exc:
            raise AttemptFailed(replica_id, f"prefill replica failed: {type(exc).__name__}") from exc
        finally:
            stream.cancel()
        raise AttemptFailed(replica_id, "the prefill stream ended without a result")

    async def _transfer(self, job: PrefillJob, meta: KVTransferMeta, reply: PrefillReply) -> Landed:
        request_id = job.request_id
        spec = await self._core.ask(lambda ack_id: CoreExpect(request_id, reply.source_id, ack_id))
        if spec is None:  # the decode side already ended the request (its lease ran out)
            return Landed(None, "aborted")
        landed = asyncio.ensure_future(self._core.ask(
            lambda ack_id: CoreCommit(request_id, reply.prefilled.result, ack_id)))
        try:
            async with asyncio.timeout(self._pd.kv_transfer_timeout_s * (meta.num_blocks + 1)):
                sent = await self._pool.send_kv.remote(KVSendOrder(reply.replica_id, meta, spec))
                if sent.error is not None:
                    raise AttemptFailed(reply.replica_id, f"KV send failed: {sent.error}")
                result = await landed
        except asyncio.TimeoutError:
            raise AttemptFailed(reply.replica_id, "the KV transfer timed out") from None
        except RayError as exc:
            raise AttemptFailed(reply.replica_id, f"prefill replica failed: {type(exc).__name__}") from exc
        finally:
            landed.cancel()
        if result.error is not None:
            raise AttemptFailed(reply.replica_id, f"KV receive failed: {result.error}")
        return result

    def _release(self, replica_id: str, request_id: str) -> None:
        """Best effort: the replica frees the hold now rather than at its lease's end."""
        with contextlib.suppress(RayError):
            self._pool.release.remote(KVRelease(replica_id, request_id))
