"""tool_call_eval: the request mix, call scoring, and its three API readers against the router app itself
(over a scripted engine, so the readers see the router's real payloads, streamed and not)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import tool_call_eval
from tool_call_senders import Case, Outcome, send

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import ServedModel
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineRequest
from k2ray.serve.http.router import build_router_app
from k2ray.serve.http.router_context import Admission, RouterContext

WEATHER = {"get_weather": tool_call_eval.TOOLS["get_weather"]}
SCRIPT = ("<think>plan</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
          '<|tool_call_argument_begin|>{"city": "Oslo", "days": 3}<|tool_call_end|><|tool_calls_section_end|>'
          "<|im_end|>")
MAX_MODEL_LEN = 1024


def test_cases_cover_every_mix() -> None:
    cases = tool_call_eval.make_cases(36, seed=0)
    mixes = {(c.api, c.is_stream, c.choice, c.is_thinking) for c in cases}
    assert len(mixes) == 36
    assert all(c.forced_name in c.tools for c in cases if c.choice == "named")
    assert all(c.forced_name is None for c in cases if c.choice != "named")


def test_call_problems() -> None:
    case = Case("openai", False, "auto", False, True, WEATHER, None, 0)
    assert tool_call_eval.call_problem(case, "get_weather", '{"city": "Oslo"}') is None
    assert tool_call_eval.call_problem(case, "get_wea", '{"city": "Oslo"}') == "undeclared"
    assert tool_call_eval.call_problem(case, "get_weather", '{"city": "Os') == "unparsable"
    assert tool_call_eval.call_problem(case, "get_weather", '{"city": "Rome"}') == "schema_invalid"


def test_score_counts_forced_calls_and_keeps_cut_calls_apart(capsys) -> None:
    named = Case("anthropic", True, "named", True, False, WEATHER, "get_weather", 0)
    auto = Case("openai", False, "auto", True, True, WEATHER, None, 1)
    outcomes = [Outcome("tool_calls", [("get_weather", '{"city": "Oslo", "days": 9}')]),
                Outcome("length", [("get_weather", '{"ci')])]
    report = tool_call_eval.score([named, auto], outcomes)
    assert report["finish_reasons"] == {"anthropic/tool_calls": 1, "openai/length": 1}
    assert report["call_problems"] == {"finished": {"schema_invalid": 1}, "length": {"unparsable": 1}}
    assert report["schema_valid_share"] == 0.0 and report["schema_invalid_by_keyword"] == {"maximum": 1}
    assert report["forced_with_call_share"] == 1.0 and report["forced"]["named_other_tool"] == 0
    tool_call_eval.print_table(report)
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["schema-valid share of finished calls"] == "0.0%"
    assert lines["required/named with a call"] == "1/1 (100.0%)"
    assert lines["calls (finished / cut by length)"] == "1 / 1"


class ScriptedEngine:
    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        for token_id in self.token_ids:
            yield EngineDelta([token_id])
        yield EngineDelta(finish_reason="stop")


@pytest.mark.parametrize("api", tool_call_eval.APIS)
@pytest.mark.parametrize("is_stream", [False, True])
async def test_readers_parse_the_routers_payloads(api, is_stream) -> None:
    checkpoint = tiny_checkpoint_dir()
    tokenizer = K2Tokenizer.from_pretrained(checkpoint)
    ctx = RouterContext(tokenizer=tokenizer, template=ChatTemplate.from_checkpoint(checkpoint),
                        engine=ScriptedEngine(tokenizer.encode(SCRIPT)), models=(ServedModel(id="k2-tiny"),),
                        max_model_len=MAX_MODEL_LEN, admission=Admission(4, retry_after_s=1))
    transport = httpx.ASGITransport(app=build_router_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        case = Case(api, is_stream, "required", True, True, WEATHER, None, 0)
        out = await send(http, case, "k2-tiny", "Weather in Oslo?", 64)
    assert out.error is None and out.finish == "tool_calls"
    assert [(name, json.loads(arguments)) for name, arguments in out.calls] == [
        ("get_weather", {"city": "Oslo", "days": 3})]
