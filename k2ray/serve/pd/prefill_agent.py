"""The prefill core's part of disaggregation (runs in the engine core process, knows no Ray).

A prefill request runs to its first token; its PrefillResult answers the replica's CorePrefill and
its KV blocks stay held (the engine's lease bounds how long) until a CoreSendKV has pushed them to
the decode core, or the request is aborted. One KVSender per decode core, built on its first order.
A send still on the wire when its request is aborted keeps the blocks until it is done: the sender
reads them while it sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from k2ray.dist.kv_connector import KVBlockStore, KVTransferConfig
from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_sender import KVSender
from k2ray.dist.kv_wire import KVTransferMeta
from k2ray.engine.kv.kv_transfer import PrefillResult
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.outputs import RequestOutput
from k2ray.engine.scheduler import RequestRejected
from k2ray.serve.pd.pd_protocol import CoreCachedHashes, CorePrefill, CoreSendKV, Prefilled, Sent
from k2ray.serve.pd.prefix_hashes import short_hash

logger = logging.getLogger(__name__)

Reply = Callable[[int, object], None]


@dataclass(frozen=True)
class SendDone:
    """Posted by a sender's future (its thread) into the core's inbox."""

    request_id: str
    ack_id: int
    future: Future


class PrefillAgent:
    def __init__(self, engine: LLMEngine, transfer: KVTransferConfig, reply: Reply,
                 post: Callable[[object], None], blocks: KVBlockStore | None = None) -> None:
        self.engine = engine
        self.blocks = blocks or engine.model_runner  # what the senders read (a test hook may slow it)
        self.transfer = transfer
        self._reply = reply
        self._post = post
        self._senders: dict[str, KVSender] = {}  # by pair id: one per decode core
        self._asks: dict[str, int] = {}  # prefilling -> the CorePrefill's ack id
        self._held: dict[str, PrefillResult] = {}  # prefilled, KV held for the decode side
        self._sending: dict[str, tuple[KVSender, KVTransferMeta]] = {}
        self._queued_since: dict[str, float] = {}  # prefills not scheduled yet -> when they were added
        self._queue_s: dict[str, float] = {}  # ... and how long each one waited, once it was
        self.num_sent = 0

    MESSAGES = (CorePrefill, CoreSendKV, CoreCachedHashes, SendDone)

    def handle(self, message: object) -> None:
        if isinstance(message, CorePrefill):
            self._prefill(message)
        elif isinstance(message, CoreCachedHashes):
            self._reply(message.ack_id, self._cached_hashes(message.max_hashes))
        elif isinstance(message, CoreSendKV):
            self._send(message)
        else:
            self._sent(message)

    def on_output(self, output: RequestOutput) -> bool:
        """True if the output is a prefill's (answered here, not streamed)."""
        if output.request_id not in self._asks:
            return False
        if output.finished:
            ack_id = self._asks.pop(output.request_id)
            result = output.prefill_result
            if result is None:  # the engine stopped it before a first token (aborted)
                self._reply(ack_id, Prefilled(None, f"prefill ended without a token ({output.finish_reason})"))
            else:
                self._held[output.request_id] = result
                self._reply(ack_id, Prefilled(result, queue_s=self._queue_s.pop(output.request_id, 0.0)))
        return True

    def after_step(self, step_start: float) -> None:
        """Prefills this step started: their time in the queue ends at its start."""
        requests = self.engine.scheduler.requests
        for request_id, since in list(self._queued_since.items()):
            request = requests.get(request_id)
            if request is None or request.num_computed_tokens > 0:
                del self._queued_since[request_id]
                self._queue_s[request_id] = max(0.0, step_start - since)

    def on_failure(self, request_id: str, error: BaseException) -> bool:
        """True if the failed request was a prefill (its ask answered, its hold dropped)."""
        self._held.pop(request_id, None)
        self._forget_queue(request_id)
        ack_id = self._asks.pop(request_id, None)
        if ack_id is None:
            return False
        self._reply(ack_id, Prefilled(None, str(error), is_rejected=isinstance(error, RequestRejected)))
        return True

    def abort(self, request_id: str) -> bool:
        """Stop a prefill or drop a hold; False if the request is not one of ours."""
        if request_id in self._sending:
            sender, meta = self._sending[request_id]
            sender.cancel(meta)  # the blocks go once the sender lets go of them (SendDone)
            return True
        if request_id in self._held:
            del self._held[request_id]
            self.engine.release_prefilled(request_id)
            return True
        ack_id = self._asks.pop(request_id, None)
        if ack_id is None:
            return False
        self._forget_queue(request_id)
        self.engine.abort_requests([request_id])
        self._reply(ack_id, Prefilled(None, "aborted"))
        return True

    def expire_idle_leases(self) -> None:
        """Holds past their lease while the engine idles (a step expires them otherwise)."""
        if self._held and not self.engine.has_unfinished_requests():
            for request_id in self.engine.expire_leases():
                self._held.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        return {"num_kv_transfers_in_flight": len(self._sending), "num_held_prefills": len(self._held),
                "num_kv_sends": self.num_sent}

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()

    def _prefill(self, message: CorePrefill) -> None:
        try:
            request = self.engine.make_request(message.request_id, message.prompt_token_ids,
                                               message.sampling_params)
            self.engine.add_prepared_request(request)
        except Exception as exc:  # rejected (too long, bad schema) or invalid
            self._reply(message.ack_id, Prefilled(None, str(exc), is_rejected=True))
            return
        self._asks[message.request_id] = message.ack_id
        self._queued_since[message.request_id] = time.monotonic()

    def _forget_queue(self, request_id: str) -> None:
        self._queued_since.pop(request_id, None)
        self._queue_s.pop(request_id, None)

    def _send(self, message: CoreSendKV) -> None:
        result = self._held.get(message.request_id)
        if result is None:
            self._reply(message.ack_id, Sent(None, f"no prefilled KV is held for {message.request_id!r}"))
            return
        sender = self._sender(message.spec)
        try:
            future = sender.send(message.meta, message.meta.src_block_ids(result))
        except ValueError as exc:
            self._reply(message.ack_id, Sent(None, str(exc)))
            return
        self._sending[message.request_id] = (sender, message.meta)
        future.add_done_callback(lambda done: self._post(SendDone(message.request_id, message.ack_id, done)))

    def _sent(self, message: SendDone) -> None:
        del self._sending[message.request_id]
        if self._held.pop(message.request_id, None) is not None:
            self.engine.release_prefilled(message.request_id)
        error = message.future.exception()
        if error is None:
            self.num_sent += 1
            self._reply(message.ack_id, Sent(message.future.result()))
        else:
            logger.warning("KV send of %s failed: %r", message.request_id, error)
            self._reply(message.ack_id, Sent(None, f"{type(error).__name__}: {error}"))

    def _cached_hashes(self, max_hashes: int) -> tuple[int, ...]:
        """The most recently cached blocks' hashes, shortened to ints (what request routers match)."""
        hashes = self.engine.kv_cache_manager.block_pool.cached_blocks.keys()
        return tuple(short_hash(h) for h in list(hashes)[-max_hashes:]) if max_hashes else ()

    def _sender(self, spec: PairSpec) -> KVSender:
        sender = self._senders.get(spec.pair_id)
        if sender is None:
            sender = self._senders[spec.pair_id] = KVSender(self.blocks, spec, self.transfer)
        return sender
