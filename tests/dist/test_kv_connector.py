"""Sender and receiver on a real gloo pair, both ends in this process (each on its own thread):
matching by request, cancels, time-outs, stale groups and layout mismatches."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from paged_blocks import PagedBlocks

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.dist.kv_pair_group import KVPairGroup, KVPeerUnavailable, PairSpec
from k2ray.dist.kv_receiver import KVReceiver
from k2ray.dist.kv_sender import KVSender
from k2ray.dist.kv_wire import KVLayoutMismatch, KVTransferCancelled, KVTransferMeta, block_bytes
from k2ray.engine.kv.kv_transfer import LatentKVLayout

LAYOUT = LatentKVLayout(3, 4, 40, torch.float32)
NUM_BLOCKS = 64
TIMEOUT_S = 1.0  # the peer is in this process: anything slower is a failure
RESULT_S = 10 * TIMEOUT_S
CPU = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ends():
    port = free_port()
    config = KVTransferConfig(TIMEOUT_S, 2 * block_bytes(LAYOUT))
    src, dst = PagedBlocks(LAYOUT, NUM_BLOCKS, seed=0), PagedBlocks(LAYOUT, NUM_BLOCKS)
    receiver = KVReceiver(dst, PairSpec("127.0.0.1", port, "t", 0), config)
    sender = KVSender(src, PairSpec("127.0.0.1", port, "t", 1), config)
    yield sender, receiver
    sender.close()
    receiver.close()


def meta(request_id: str, num_blocks: int, layout: LatentKVLayout = LAYOUT) -> KVTransferMeta:
    return KVTransferMeta(request_id, 0, num_blocks, layout)


def test_transfers_match_by_request_in_any_order_and_copy_exactly(ends) -> None:
    sender, receiver = ends
    a, b, empty = receiver.recv(meta("a", 5), [10, 11, 12, 13, 14]), receiver.recv(meta("b", 1), [20]), \
        receiver.recv(meta("empty", 0), [])
    sent = [sender.send(meta("b", 1), [7]), sender.send(meta("empty", 0), []),
            sender.send(meta("a", 5), [1, 2, 3, 4, 5])]
    assert [f.result(RESULT_S).num_blocks for f in sent] == [1, 0, 5]
    assert (a.result(RESULT_S).num_blocks, b.result(RESULT_S).num_blocks, empty.result(RESULT_S).num_blocks) \
        == (5, 1, 0)
    assert torch.equal(receiver.blocks.read_kv_blocks([10, 11, 12, 13, 14, 20]),
                       sender.blocks.read_kv_blocks([1, 2, 3, 4, 5, 7]))
    assert receiver.num_in_flight == 0 and receiver.group.num_builds == 1


def warm_up(sender: KVSender, receiver: KVReceiver) -> None:
    future = receiver.recv(meta("warm", 1), [0])
    sender.send(meta("warm", 1), [0]).result(RESULT_S)
    future.result(RESULT_S)


def test_cancelled_receive_is_drained_and_never_written(ends) -> None:
    sender, receiver = ends
    warm_up(sender, receiver)  # the pair is up: the receiver drains even with nothing pending
    future = receiver.recv(meta("gone", 3), [30, 31, 32])
    assert receiver.cancel("gone") and not receiver.cancel("gone")
    with pytest.raises(KVTransferCancelled):
        future.result(0)
    before = receiver.blocks.read_kv_blocks(range(NUM_BLOCKS))
    sender.send(meta("gone", 3), [1, 2, 3]).result(RESULT_S)
    after = receiver.recv(meta("next", 1), [40])
    sender.send(meta("next", 1), [6]).result(RESULT_S)
    after.result(RESULT_S)
    written = receiver.blocks.read_kv_blocks(range(NUM_BLOCKS))
    assert torch.equal(written[:, 40], sender.blocks.read_kv_blocks([6])[:, 0])
    written[:, 40] = before[:, 40]
    assert torch.equal(written, before) and receiver.num_drained == 1


def test_sender_cancel_releases_the_waiting_receiver(ends) -> None:
    sender, receiver = ends
    future = receiver.recv(meta("never_prefilled", 2), [1, 2])
    assert sender.cancel(meta("never_prefilled", 2))
    with pytest.raises(KVTransferCancelled, match="sender cancelled"):
        future.result(RESULT_S)
    assert receiver.group.num_builds == 1


def test_receive_times_out_then_both_ends_rebuild_on_next_use(ends) -> None:
    sender, receiver = ends
    warm_up(sender, receiver)
    silent = receiver.recv(meta("silent", 1), [2])
    assert isinstance(silent.exception(RESULT_S), KVPeerUnavailable)
    # The sender's group died with the receiver's; its next send rebuilds and retries once.
    after = receiver.recv(meta("after", 2), [3, 4])
    assert sender.send(meta("after", 2), [8, 9]).result(RESULT_S).num_blocks == 2
    after.result(RESULT_S)
    assert torch.equal(receiver.blocks.read_kv_blocks([3, 4]), sender.blocks.read_kv_blocks([8, 9]))
    assert receiver.group.num_builds == sender.group.num_builds == 2


def test_layout_mismatch_is_a_clear_error_at_either_end_and_on_the_wire(ends) -> None:
    sender, receiver = ends
    other = LatentKVLayout(3, 4, 40, torch.bfloat16)
    with pytest.raises(KVLayoutMismatch, match="layout mismatch"):
        receiver.recv(meta("r", 1, other), [1])
    with pytest.raises(KVLayoutMismatch, match="layout mismatch"):
        sender.send(meta("r", 1, other), [1])
    # A sender over another layout: the receiver fails that transfer, drains it, and stays in step.
    port = free_port()
    config = KVTransferConfig(TIMEOUT_S)
    receiver2 = KVReceiver(PagedBlocks(LAYOUT, NUM_BLOCKS), PairSpec("127.0.0.1", port, "m", 0), config)
    sender2 = KVSender(PagedBlocks(other, NUM_BLOCKS, seed=1), PairSpec("127.0.0.1", port, "m", 1), config)
    try:
        future = receiver2.recv(meta("r", 1), [1])
        sender2.send(meta("r", 1, other), [1]).result(RESULT_S)
        with pytest.raises(KVLayoutMismatch, match="layout mismatch"):
            future.result(RESULT_S)
        assert receiver2.group.is_connected
    finally:
        sender2.close()
        receiver2.close()


def test_rendezvous_times_out_without_a_peer_and_a_stale_group_is_rebuilt() -> None:
    port = free_port()
    lonely = KVPairGroup(PairSpec("127.0.0.1", port, "s", 0), CPU, TIMEOUT_S)
    with pytest.raises(KVPeerUnavailable, match="no peer within"):
        lonely.connect()
    host, guest = lonely, KVPairGroup(PairSpec("127.0.0.1", port, "s", 1), CPU, TIMEOUT_S)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(host.connect), pool.submit(guest.connect)]:
            future.result(RESULT_S)
        guest.teardown()  # say its process restarted: rank 0 still holds the old group
        with pytest.raises(KVPeerUnavailable, match="older group"):
            guest.connect()
        for future in [pool.submit(host.connect), pool.submit(guest.connect)]:
            future.result(RESULT_S)
        value = torch.arange(4.0)
        received = torch.empty(4)
        for future in [pool.submit(guest.send, value), pool.submit(host.recv, received)]:
            future.result(RESULT_S)
    assert torch.equal(received, value) and host.num_builds == 2
    host.teardown()
    guest.teardown()
