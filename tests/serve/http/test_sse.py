"""SSE framing: the per-stream chunk framer writes exactly what framing the whole payload would."""

from __future__ import annotations

import pytest

from k2ray.serve.http.sse import ChunkFramer, sse_data

HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "k2-tiny"}


@pytest.mark.parametrize("usage_null", [True, False])
def test_chunk_framer_matches_full_payload(usage_null):
    choice = {"index": 0, "text": 'h\u00e9llo "x"\n\u2028', "logprobs": None, "finish_reason": None}
    payload = {**HEAD, "choices": [choice]}
    if usage_null:
        payload["usage"] = None
    assert ChunkFramer(HEAD, usage_null).frame(choice) == sse_data(payload)
