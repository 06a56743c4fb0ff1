from __future__ import annotations

from dataclasses import dataclass, field

from k2ray.api.detokenizer import IncrementalDetokenizer
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.outputs import CompletionOutput, Logprob, RequestOutput, SampledLogprobs
from k2ray.engine.request import Request, RequestStatus
from k2ray.engine.stop_checker import find_stop_string
from k2ray.sampling_params import SamplingParams


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    num_sent_logprobs: int = 0


class OutputProcessor:
    """Turns the scheduler's updated requests into RequestOutputs: detokenizes, applies stop strings,
    gathers logprobs. Streaming requests get a delta each step; the others one final output.

    Text is detokenized incrementally only where it is needed every step (streaming or stop strings);
    otherwise it is decoded once when the request finishes.
    """

    def __init__(self, tokenizer: K2Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, stream: bool) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer (skip_tokenizer_init=True was set)")
        incremental = self.tokenizer is not None and (stream or bool(params.stop))
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if incremental else None
        state = _RequestState(request_id, prompt, prompt_token_ids, params, stream, detokenizer)
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        self.states[request_id] = state

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def update(self, requests: list[Request], logprobs: dict[str, SampledLogprobs]) -> list[Request]:
        """Take each request's new token; returns the requests a stop string finished (the caller
        finishes them in the scheduler before calling make_outputs)."""
        stopped = []
        for request in requests:
            state = self.states.get(request.request_id)
            if state is None:
                continue
            new_token = request.output_token_ids[-1]
            state.token_ids.append(new_token)
            if state.logprobs is not None and request.request_id in logprobs:
                self._add_logprobs(state, new_token, logprobs[request.request_id])
            if state.detokenizer is not None and self._update_text(state, request):
                if request.is_finished:  # finished by length on the same token: the stop string wins
                    request.status = RequestStatus.FINISHED_STOPPED
                else:
                    stopped.append(request)
        return stopped

    def make_outputs(self, requests: list[Request]) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            state = self.states.get(request.request_id)
            if state is None:
                continue
            if request.is_finished:
                outputs.append(self._finish(state, request))
            elif state.stream:
                outputs.append(self._make_output(state, request, finished=False))
        return outputs

    def make_error_output(self, request: Request) -> RequestOutput | None:
        state = self.states.pop(request.request_id, None)
        return None if state is None else self._make_output(state, request, finished=True)

    def _update_text(self, state: _RequestState, request: Request) -> bool:
        """Push the new token; True if a stop string finished the request."""
        params = state.params
        stop_terminated = request.status == RequestStatus.FINISHED_STOPPED
        if stop_terminated and not params.include_stop_str_in_output:
            return False  # vLLM leaves the eos / stop token's own text out
        delta = state.detokenizer.push([state.token_ids[-1]])
        state.text += delta
        if not params.stop or request.num_output_tokens <= params.min_tokens:
            return False
        hit = find_stop_string(state.text, len(delta), params.stop, params.include_stop_str_in_output)
        if hit is None:
            return False
        request.stop_reason, truncate_to = hit
        state.text = state.text[:truncate_to]
        return True

    def _finish(self, state: _RequestState, request: Request) -> RequestOutput:
        del self.states[request.request_id]
        if self.tokenizer is not None and state.detokenizer is None:
            token_ids = state.token_ids
            if request.status == RequestStatus.FINISHED_STOPPED and not state.params.include_stop_str_in_output:
                token_ids = token_ids[:-1]
            state.text = self.tokenizer.decode(token_ids, skip_special_tokens=state.params.skip_special_tokens)
        elif state.detokenizer is not None and not isinstance(request.stop_reason, str):
            state.text += state.detokenizer.flush()
        return self._make_output(state, request, finished=True)

    def _add_logprobs(self, state: _RequestState, token_id: int, sampled: SampledLogprobs) -> None:
        entry = {token_id: Logprob(sampled.logprob, sampled.rank, self._decode_one(token_id))}
        for rank, (alt_id, alt_logprob) in enumerate(zip(sampled.top_token_ids, sampled.top_logprobs,
                                                         strict=True), start=1):
            if alt_id not in entry:
                entry[alt_id] = Logprob(alt_logprob, rank, self._decode_one(alt_id))
        state.logprobs.append(entry)
        state.cumulative_logprob += sampled.logprob

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, state: _RequestState, request: Request, finished: bool) -> RequestOutput:
        if state.stream:
            token_ids = state.token_ids[state.num_sent_tokens:]
            # Hold back text that a stop string could still claim, so a sent delta is never truncated.
            holdback = 0 if finished or not state.params.stop else max(map(len, state.params.stop)) - 1
            sendable = max(state.num_sent_chars, len(state.text) - holdback)
            text = state.text[state.num_sent_chars:sendable]
            logprobs = state.logprobs[state.num_sent_logprobs:] if state.logprobs is not None else None
            state.num_sent_tokens, state.num_sent_chars = len(state.token_ids), sendable
            state.num_sent_logprobs = len(state.logprobs) if state.logprobs is not None else 0
        else:
            token_ids, text, logprobs = list(state.token_ids), state.text, state.logprobs
        completion = CompletionOutput(
            index=0, text=text, token_ids=token_ids, cumulative_logprob=state.cumulative_logprob,
            logprobs=logprobs, finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None)
        return RequestOutput(request.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             request.num_cached_tokens or 0)
