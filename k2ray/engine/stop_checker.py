from __future__ import annotations

from k2ray.engine.request import Request, RequestStatus


def check_stop_token(request: Request, max_model_len: int) -> RequestStatus | None:
    """Token-level stop after a new output token (vLLM semantics): eos and stop_token_ids only once
    min_tokens are out (eos skipped under ignore_eos), then max_tokens and max_model_len.
    Sets `request.stop_reason` to the stop token id (None for eos)."""
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in request.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def find_stop_string(text: str, num_new_chars: int, stop: list[str],
                     include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """Search the text that the last `num_new_chars` characters could complete for the earliest
    stop string. Returns (stop string, length to truncate the text to) or None."""
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    if best is None:
        return None
    index, stop_str = best
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index
