"""An in-process FakeEngine for router unit tests (never used by the serving path).

It replays a fixed token script per request (or the request's injected script), honours max_tokens
and stop token ids, and records which requests were started, finished and aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.serve.args import ServedModel
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, EngineOverloaded, EngineRequest
from k2ray.serve.http.router_context import Admission, RouterContext

FAKE_MAX_MODEL_LEN = 512


@dataclass
class FakeEngine:
    default_script: list[int]
    num_cached_tokens: int = 0
    token_delay_s: float = 0.0
    overloaded: bool = False
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    requests: list[EngineRequest] = field(default_factory=list)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        if self.overloaded:
            raise EngineOverloaded("fake engine is full")
        self.started.append(request.request_id)
        self.requests.append(request)
        injection = request.injection
        script = list(injection.script_token_ids) if injection and injection.script_token_ids else self.default_script
        stop_ids = set(request.sampling_params.stop_token_ids)
        budget = request.sampling_params.max_tokens or len(script)
        done = False
        try:
            for i, token_id in enumerate(script):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if injection and injection.fail_after_tokens is not None and i >= injection.fail_after_tokens:
                    done = True
                    yield EngineDelta(failure=EngineFailure("internal", "boom: secret internals"))
                    return
                finish = "stop" if token_id in stop_ids else ("length" if i + 1 >= budget else None)
                done = finish is not None
                yield EngineDelta([token_id], num_cached_tokens=self.num_cached_tokens, finish_reason=finish)
                if done:
                    self.finished.append(request.request_id)
                    return
            done = True
            self.finished.append(request.request_id)
            yield EngineDelta(num_cached_tokens=self.num_cached_tokens, finish_reason="stop")
        finally:
            if not done:
                self.aborted.append(request.request_id)


def make_context(checkpoint_dir: str, engine: FakeEngine, *, max_inflight: int = 8,
                 allow_injection: bool = True,
                 models: tuple[ServedModel, ...] = (ServedModel(id="k2-tiny"),)) -> RouterContext:
    return RouterContext(
        tokenizer=K2Tokenizer.from_pretrained(checkpoint_dir),
        template=ChatTemplate.from_checkpoint(checkpoint_dir),
        engine=engine,
        models=models,
        max_model_len=FAKE_MAX_MODEL_LEN,
        admission=Admission(max_inflight, retry_after_s=1),
        allow_injection=allow_injection,
        created=0,
    )
