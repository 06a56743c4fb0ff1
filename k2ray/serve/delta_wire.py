"""Wire format of the delta channel (engine replica -> router replica): length-prefixed JSON frames.

A frame is a 4-byte big-endian payload length, then UTF-8 JSON. The first frame on a connection is
the handshake `{"token": ...}` (the router's per-replica secret from `ReplyAddress`); every later frame
is a list of deltas, one row per engine request that advanced in that engine step:
`[request_id, token_ids, logprobs, num_cached_tokens, finish_reason, failure_kind, failure_message]`,
logprobs as `[[token_id, logprob], ...]` per token (JSON keys would turn the ids into strings).
JSON rather than pickle: the router must never run code a peer on the network chose.
"""

from __future__ import annotations

import asyncio
import json
import struct

from k2ray.serve.engine_protocol import EngineDelta, EngineFailure

FRAME_HEADER = struct.Struct(">I")
# A frame carries one engine step's deltas for one router: far below this unless something is wrong.
MAX_FRAME_BYTES = 64 << 20


class WireError(Exception):
    """The peer sent something that is not a valid frame."""


def encode_frame(payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return FRAME_HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> object:
    """The next frame's payload; raises asyncio.IncompleteReadError at a clean end of stream."""
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return json.loads(await reader.readexactly(size))
    except ValueError as exc:
        raise WireError(f"frame is not JSON: {exc}") from None


def encode_delta(request_id: str, delta: EngineDelta) -> list:
    logprobs = None
    if delta.logprobs is not None:
        logprobs = [list(step.items()) for step in delta.logprobs]
    failure = delta.failure
    return [request_id, delta.token_ids, logprobs, delta.num_cached_tokens, delta.finish_reason,
            failure.kind if failure else None, failure.message if failure else None]


def decode_delta(row: list) -> tuple[str, EngineDelta]:
    try:
        request_id, token_ids, logprobs, num_cached_tokens, finish_reason, failure_kind, failure_message = row
    except (TypeError, ValueError):
        raise WireError(f"malformed delta row: {row!r:.200}") from None
    if logprobs is not None:
        logprobs = [{int(tid): float(lp) for tid, lp in step} for step in logprobs]
    failure = EngineFailure(failure_kind, failure_message) if failure_kind is not None else None
    return str(request_id), EngineDelta([int(t) for t in token_ids], logprobs, int(num_cached_tokens),
                                        finish_reason, failure)
