"""The edge's bounds on one HTTP request: body bytes (413), JSON nesting depth, prompts and choices (400).

All of them are checked before any tokenization, from what the body costs to look at: the declared
Content-Length, the bytes as they arrive, one vectorized pass over the raw JSON, the parsed list sizes.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from k2ray.serve.args import RequestLimits
from k2ray.serve.http.errors import invalid_request, request_too_large

# Byte classes of a JSON text: string delimiters and brackets, and each bracket's step in depth.
_QUOTE = ord('"')
_IS_MARK = np.zeros(256, dtype=bool)
_IS_MARK[list(b'"[]{}')] = True
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1
# Escapes that could hide or fake a string delimiter, blanked (same length) before the scan; pairs are
# replaced from the left as JSON reads them, so `\\"` keeps its closing quote and `\\\"` does not.
_ESCAPED_BACKSLASH, _ESCAPED_QUOTE, _BLANK = b"\\\\", b'\\"', b"__"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `max_bytes` (declared or read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise request_too_large(max_bytes)
    chunks: list[bytes] = []
    num_bytes = 0
    async for chunk in request.stream():
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise request_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count).

    Exact for valid JSON; for invalid JSON any number (the parser refuses the body anyway).
    """
    text = body.replace(_ESCAPED_BACKSLASH, _BLANK).replace(_ESCAPED_QUOTE, _BLANK)
    raw = np.frombuffer(text, dtype=np.uint8)
    marks = raw[_IS_MARK[raw]]
    if marks.size == 0:
        return 0
    outside_strings = np.cumsum(marks == _QUOTE, dtype=np.int32) % 2 == 0
    depth = np.cumsum(np.where(outside_strings, _DEPTH_STEP[marks], 0), dtype=np.int32)
    return max(0, int(depth.max()))


def check_json_depth(body: bytes, max_depth: int) -> None:
    # Cheap exit: no more opening brackets in all than the bound allows nested.
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    if json_depth(body) > max_depth:
        raise invalid_request(f"Request body nests arrays and objects deeper than {max_depth} levels.")


def check_fan_out(limits: RequestLimits, num_prompts: int, n: int, max_inflight: int) -> None:
    """Prompts x n engine requests, all admitted with this HTTP request: each bound is its own 400."""
    if n > limits.max_n:
        raise invalid_request(f"n must be at most {limits.max_n}, got {n}.", param="n")
    if num_prompts > limits.max_prompts:
        raise invalid_request(f"At most {limits.max_prompts} prompts are accepted per request, got {num_prompts}.",
                              param="prompt")
    num_requests = num_prompts * n
    max_requests = min(limits.max_engine_requests, max_inflight)
    if num_requests > max_requests:
        raise invalid_request(f"This request asks for {num_requests} completions ({num_prompts} prompts x n={n}); "
                              f"at most {max_requests} are accepted per request.", param="n")
