"""The decode core's part of disaggregation (runs in the engine core process, knows no Ray).

CoreReserve looks the prompt up in this engine's prefix cache: when what is missing is shorter than
the local-prefill threshold the request is prefilled here like any other; otherwise blocks are
reserved (a request that finds none free waits, in order, for the next ones freed). CoreExpect
posts the receive on the pair with the chosen prefill replica (rank 0 here: this core hosts the
pair's rendezvous); CoreCommit starts the decode once the KV has landed. A receive that fails is
answered to the replica, which retries elsewhere; the reservation stays until the request ends.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_receiver import KVReceiver
from k2ray.dist.kv_wire import KVTransferMeta
from k2ray.engine.kv.kv_transfer import KVReservation
from k2ray.engine.llm_engine import LLMEngine
from k2ray.serve.engine.engine_core_protocol import CoreAdd
from k2ray.serve.pd.pd_protocol import (
    CoreCancelReceive,
    CoreCommit,
    CoreExpect,
    CoreReserve,
    Landed,
    Reserved,
)

Reply = Callable[[int, object], None]
PAIR_HOST_RANK, PAIR_PEER_RANK = 0, 1


@dataclass(frozen=True)
class ReceiveDone:
    """Posted by a receiver's future (its thread) into the core's inbox."""

    request_id: str
    future: Future


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class DecodeAgent:
    def __init__(self, engine: LLMEngine, transfer: KVTransferConfig, host: str, core_id: str, reply: Reply,
                 post: Callable[[object], None], add_local: Callable[[CoreAdd], None]) -> None:
        self.engine = engine
        self.transfer = transfer
        self.host = host
        self.core_id = core_id
        self._reply = reply
        self._post = post
        self._add_local = add_local
        self._receivers: dict[str, KVReceiver] = {}  # by prefill replica
        self._waiting: deque[CoreReserve] = deque()  # no free blocks yet
        self._reservations: dict[str, KVReservation] = {}
        self._receiving: dict[str, tuple[KVReceiver, Future]] = {}
        self._landed: dict[str, Landed] = {}  # KV in, commit not asked yet
        self._commits: dict[str, CoreCommit] = {}  # commit asked, KV not in yet
        self.num_local_prefills = 0
        self.num_remote_prefills = 0

    MESSAGES = (CoreReserve, CoreExpect, CoreCommit, CoreCancelReceive, ReceiveDone)

    def handle(self, message: object) -> None:
        if isinstance(message, CoreReserve):
            self._waiting.append(message)
            self.admit_waiting()
        elif isinstance(message, CoreExpect):
            self._expect(message)
        elif isinstance(message, CoreCommit):
            self._commit(message)
        elif isinstance(message, CoreCancelReceive):
            self._cancel_receive(message.request_id)
            self._reply(message.ack_id, None)
        else:
            self._received(message)

    def admit_waiting(self) -> None:
        """Reserve for waiting requests, oldest first, while blocks are free."""
        while self._waiting:
            message = self._waiting[0]
            try:
                reserved = self._reserve(message)
            except Exception:  # rejected or invalid: the engine raises again there and delivers the failure
                self._waiting.popleft()
                self._add_local(message.add)
                self._reply(message.ack_id, Reserved(None))
                continue
            if reserved is None:
                return
            self._waiting.popleft()
            self._reply(message.ack_id, reserved)

    def abort(self, request_id: str) -> bool:
        """Cancel the request's receive (before its blocks are freed) and forget it; False if it was
        only waiting for blocks (nothing in the engine to abort)."""
        self._cancel_receive(request_id)
        for message in self._waiting:
            if message.add.request_id == request_id:
                self._waiting.remove(message)
                self._reply(message.ack_id, Reserved(None))
                return False
        self._reservations.pop(request_id, None)
        return True

    def expire_idle_leases(self) -> list[str]:
        if self._reservations and not self.engine.has_unfinished_requests():
            return self.engine.expire_leases()
        return []

    def forget(self, request_ids: list[str]) -> None:
        """Requests the engine ended (a lease expired, a step failed)."""
        for request_id in request_ids:
            self._cancel_receive(request_id)
            self._reservations.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        return {"num_kv_transfers_in_flight": len(self._receiving), "num_waiting_for_blocks": len(self._waiting),
                "num_local_prefills": self.num_local_prefills, "num_remote_prefills": self.num_remote_prefills}

    def close(self) -> None:
        for receiver in self._receivers.values():
            receiver.close()

    def _reserve(self, message: CoreReserve) -> Reserved | None:
        add = message.add
        request = self.engine.make_request(add.request_id, add.prompt_token_ids, add.sampling_params)
        _, num_cached_tokens = self.engine.kv_cache_manager.get_computed_blocks(request)
        num_missing = request.num_prompt_tokens - num_cached_tokens
        is_scripted = add.injection is not None and add.injection.script_token_ids is not None  # test hook
        if num_missing < message.local_prefill_threshold or is_scripted:
            self.num_local_prefills += 1
            self._add_local(add)
            return Reserved(None)
        reservation = self.engine.add_prefilled_request(add.request_id, add.prompt_token_ids, None,
                                                        add.sampling_params, stream=True)
        if reservation is None:
            return None
        self.num_remote_prefills += 1
        self._reservations[add.request_id] = reservation
        return Reserved(KVTransferMeta.from_reservation(reservation, self.engine.model_runner.kv_layout))

    def _expect(self, message: CoreExpect) -> None:
        reservation = self._reservations.get(message.request_id)
        if reservation is None:
            self._reply(message.ack_id, None)  # aborted meanwhile
            return
        self._cancel_receive(message.request_id)
        receiver = self._receiver(message.source_id)
        meta = KVTransferMeta.from_reservation(reservation, receiver.layout)
        future = receiver.recv(meta, reservation.block_ids_to_fill)
        self._receiving[message.request_id] = (receiver, future)
        future.add_done_callback(lambda done: self._post(ReceiveDone(message.request_id, done)))
        spec = receiver.group.spec
        self._reply(message.ack_id, PairSpec(spec.host, spec.port, spec.pair_id, PAIR_PEER_RANK))

    def _received(self, message: ReceiveDone) -> None:
        current = self._receiving.get(message.request_id)
        if current is None or current[1] is not message.future:
            return  # a receive given up on (cancelled, retried): its outcome is stale
        del self._receiving[message.request_id]
        error = message.future.exception()
        landed = Landed(message.future.result()) if error is None else Landed(None, f"{type(error).__name__}: {error}")
        commit = self._commits.pop(message.request_id, None)
        if commit is None:
            self._landed[message.request_id] = landed
        else:
            self._finish(commit, landed)

    def _commit(self, message: CoreCommit) -> None:
        landed = self._landed.pop(message.request_id, None)
        if landed is not None:
            self._finish(message, landed)
        elif message.request_id in self._receiving:
            self._commits[message.request_id] = message
        else:
            self._reply(message.ack_id, Landed(None, f"no receive is posted for {message.request_id!r}"))

    def _finish(self, commit: CoreCommit, landed: Landed) -> None:
        if landed.error is None:
            if self.engine.commit_prefilled(commit.request_id, commit.prefill_result):
                self._reservations.pop(commit.request_id, None)
            else:
                landed = Landed(None, f"{commit.request_id!r} was aborted before its KV landed")
        self._reply(commit.ack_id, landed)

    def _cancel_receive(self, request_id: str) -> None:
        current = self._receiving.pop(request_id, None)
        if current is not None:
            current[0].cancel(request_id)
        self._landed.pop(request_id, None)
        commit = self._commits.pop(request_id, None)
        if commit is not None:
            self._reply(commit.ack_id, Landed(None, f"the receive of {request_id!r} was cancelled"))

    def _receiver(self, source_id: str) -> KVReceiver:
        receiver = self._receivers.get(source_id)
        if receiver is None:
            spec = PairSpec(self.host, free_port(self.host), f"{self.core_id}-{source_id}", PAIR_HOST_RANK)
            receiver = self._receivers[source_id] = KVReceiver(self.engine.model_runner, spec, self.transfer)
        return receiver
