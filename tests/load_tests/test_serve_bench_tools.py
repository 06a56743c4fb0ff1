"""serve_bench --tools: its chat sender's requests (none, json_object, tools auto, tools required) are ones the router
accepts and streams (over a scripted engine), and each path is scored against the no-tools path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import serve_bench
from bench_report import against_baseline
from bench_senders import chat_sender, prompt_text

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import ServedModel
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineRequest
from k2ray.serve.http.router import build_router_app
from k2ray.serve.http.router_context import Admission, RouterContext

SCRIPT = "word word word"
MAX_MODEL_LEN = 1024


class ScriptedEngine:
    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.requests.append(request)
        for token_id in self.token_ids:
            yield EngineDelta([token_id])
        yield EngineDelta(finish_reason="length")


@pytest.mark.parametrize("tool_choice", list(serve_bench.TOOL_PATHS.values()))
async def test_chat_sender_requests_stream_through_the_router(tool_choice: str | None) -> None:
    checkpoint = tiny_checkpoint_dir()
    tokenizer = K2Tokenizer.from_pretrained(checkpoint)
    engine = ScriptedEngine(tokenizer.encode(SCRIPT))
    ctx = RouterContext(tokenizer=tokenizer, template=ChatTemplate.from_checkpoint(checkpoint), engine=engine,
                        models=(ServedModel(id="k2-tiny"),), max_model_len=MAX_MODEL_LEN,
                        admission=Admission(4, retry_after_s=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_router_app(ctx)),
                                 base_url="http://bench") as client:
        result = await chat_sender(client, "k2-tiny", 1.0, tool_choice)([3, 14, 15], 8)
    assert result.ok and result.error is None and result.num_output_tokens == len(engine.token_ids)
    structured = engine.requests[0].sampling_params.structured_output
    assert (structured is None) == (tool_choice is None)
    assert (tool_choice is not None and structured.tool_calls is not None) == (tool_choice in ("auto", "required"))
    assert engine.requests[0].sampling_params.ignore_eos


def test_prompt_text_is_the_same_for_the_same_ids() -> None:
    assert prompt_text([0, 11, 2]) == prompt_text([0, 11, 2]) != prompt_text([1, 11, 2])


def test_paths_are_scored_against_the_baseline() -> None:
    def path(tok_s: float, tpot: float) -> dict:
        return {"output_tokens_per_s": tok_s, "tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": 10.0}}
    cost = against_baseline({"no_tools": path(100.0, 4.0), "tools_auto": path(80.0, 5.0)}, "no_tools")
    assert cost == {"tools_auto_vs_no_tools": {"throughput_ratio": 0.8, "tpot_p50_ratio": 1.25,
                                               "tpot_p50_delta_ms": 1.0, "ttft_p50_delta_ms": 0.0}}
    assert serve_bench.parse_args(["--tools"]).tools and not serve_bench.parse_args([]).tools
