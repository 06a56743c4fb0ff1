"""The transfer's control metadata and wire header: round trip, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_wire import (
    KVLayoutMismatch,
    KVTransferMeta,
    TransferHeader,
    TransferStatus,
    block_bytes,
    check_layout,
    decode_header,
    encode_header,
    request_key,
)
from k2ray.engine.kv.kv_transfer import KVReservation, LatentKVLayout, PrefillResult

TINY = LatentKVLayout(3, 4, 40, torch.float32)
K2 = LatentKVLayout(61, 16, 576, torch.bfloat16)


def test_header_round_trips_and_rejects_what_is_not_one() -> None:
    header = TransferHeader(request_key("req-1"), TransferStatus.DATA, 7, 3, K2)
    assert decode_header(encode_header(header)) == header
    assert request_key("req-1") != request_key("req-2")
    values = encode_header(header)
    values[0] = 0
    with pytest.raises(ValueError, match="not a KV transfer header"):
        decode_header(values)
    values = encode_header(header)
    values[4] = 9  # no such status
    with pytest.raises(ValueError, match="malformed"):
        decode_header(values)


def test_meta_names_only_the_blocks_the_decode_side_lacks() -> None:
    meta = KVTransferMeta.from_reservation(KVReservation("r", (8, 1, 2), num_computed_blocks=1), TINY)
    assert (meta.num_computed_blocks, meta.num_blocks) == (1, 2)
    assert meta.src_block_ids(PrefillResult("r", 5, None, 0, (3, 4, 5), 10)) == (4, 5)
    with pytest.raises(ValueError, match="does not match"):
        meta.src_block_ids(PrefillResult("other", 5, None, 0, (3, 4, 5), 10))
    with pytest.raises(ValueError, match="disagree"):
        meta.src_block_ids(PrefillResult("r", 5, None, 0, (3, 4), 6))


def test_layouts_sizes_and_config_checks() -> None:
    assert block_bytes(K2) == 61 * 16 * 576 * 2
    check_layout(TINY, LatentKVLayout(3, 4, 40, torch.float32), "same")
    with pytest.raises(KVLayoutMismatch, match="layout mismatch"):
        check_layout(TINY, LatentKVLayout(3, 4, 40, torch.bfloat16), "dtype differs")
    assert KVTransferConfig(max_chunk_bytes=1).chunk_blocks(K2) == 1
    assert KVTransferConfig(max_chunk_bytes=10 * block_bytes(TINY) + 1).chunk_blocks(TINY) == 10
    with pytest.raises(ValueError, match="timeout_s"):
        KVTransferConfig(timeout_s=0)
    with pytest.raises(ValueError, match="ranks 0 and 1"):
        PairSpec("127.0.0.1", 1234, "p", 2)
    with pytest.raises(ValueError, match="pair_id"):
        PairSpec("127.0.0.1", 1234, "a/b", 0)
