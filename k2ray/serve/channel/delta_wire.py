"""Wire format of the delta channel (engine replica -> router replica).

A connection opens with a fixed-size handshake, `MAGIC` then the router replica's token (`ReplyAddress`),
so a peer that has not authenticated gets the router to read `HANDSHAKE_SIZE` bytes and no more. Every
later frame is a 4-byte big-endian payload length, then UTF-8 JSON: a list of deltas, one row per
engine request that advanced in that engine step:
`[request_id, token_ids, logprobs, num_cached_tokens, finish_reason, failure_kind, failure_message, claim]`,
logprobs as `[[token_id, logprob], ...]` per token (JSON keys would turn the ids into strings). `claim` is
the request's own secret (`ReplyAddress.claim`) on the request's first row and null on later ones: it
binds the request to the connection that carried it, so no other engine can write its deltas.
JSON rather than pickle: the router must never run code a peer on the network chose.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import struct

from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure

FRAME_HEADER = struct.Struct(">I")
# A frame carries one engine step's deltas for one router: far below this unless something is wrong.
MAX_FRAME_BYTES = 64 << 20
MAGIC = b"K2D1"  # protocol and version: a stray client fails the handshake, whatever it sends
SECRET_BYTES = 16  # tokens and claims: hex of this many random bytes
HANDSHAKE_SIZE = len(MAGIC) + 2 * SECRET_BYTES
FINISH_REASONS = ("stop", "length", "abort")
FAILURE_KINDS = ("rejected", "internal", "unavailable")


class WireError(Exception):
    """The peer sent something that is not a valid frame."""


def new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def encode_handshake(token: str) -> bytes:
    hello = MAGIC + token.encode()
    if len(hello) != HANDSHAKE_SIZE:
        raise ValueError(f"a channel token is {2 * SECRET_BYTES} hex digits, got {len(token)} characters")
    return hello


def is_secret(value: object, secret: str) -> bool:
    """Whether a peer's `value` is `secret`, in time independent of where they differ."""
    return isinstance(value, str) and hmac.compare_digest(value.encode(), secret.encode())


def is_handshake(hello: bytes, token: str) -> bool:
    return hmac.compare_digest(hello, MAGIC + token.encode())


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


def encode_delta(request_id: str, delta: EngineDelta, claim: str | None = None) -> list:
    logprobs = None
    if delta.logprobs is not None:
        logprobs = [list(step.items()) for step in delta.logprobs]
    failure = delta.failure
    return [request_id, delta.token_ids, logprobs, delta.num_cached_tokens, delta.finish_reason,
            failure.kind if failure else None, failure.message if failure else None, claim]


def decode_delta(row: object) -> tuple[str, EngineDelta, str | None]:
    """(request_id, delta, claim) of one row; WireError for anything not shaped as `encode_delta` makes."""
    try:
        request_id, token_ids, logprobs, num_cached_tokens, finish_reason, failure_kind, failure_message, claim = row
        if logprobs is not None:
            logprobs = [{int(tid): float(lp) for tid, lp in step} for step in logprobs]
        delta = EngineDelta([int(t) for t in token_ids], logprobs, int(num_cached_tokens), finish_reason)
    except (TypeError, ValueError):
        raise WireError(f"malformed delta row: {row!r:.200}") from None
    if not isinstance(request_id, str) or not (claim is None or isinstance(claim, str)):
        raise WireError(f"malformed delta row: {row!r:.200}")
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise WireError(f"unknown finish reason {finish_reason!r:.50}")
    if failure_kind is not None:
        if failure_kind not in FAILURE_KINDS or not isinstance(failure_message, str):
            raise WireError(f"malformed failure {failure_kind!r:.50}")
        delta.failure = EngineFailure(failure_kind, failure_message)
    return request_id, delta, claim
