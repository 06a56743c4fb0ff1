"""The test hooks are fenced: a production deployment never imports `k2ray.serve.test_hooks`, and a
request carrying `k2ray_test` gets a clear 400 there (the router app over a FakeEngine, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import httpx

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.router import build_router_app

from .fakes import FakeEngine, make_context

CKPT = str(tiny_checkpoint_dir())
IMPORT_TIMEOUT_S = 120
HOOKS = "k2ray.serve.test_hooks"
# In a fresh interpreter: every serving module, a request parsed and refused by a production router
# context, then the same context with injection allowed.
FENCE_CHECK = f"""
import sys
from dataclasses import replace
import k2ray.serve.app, k2ray.serve.http.router, k2ray.serve.engine.engine_server, k2ray.serve.engine.engine_core
import k2ray.serve.engine.engine_core_client, k2ray.serve.engine.channel_engine_client, k2ray.serve.engine.engine_client
from k2ray.api.openai_protocol import ChatCompletionRequest
from k2ray.serve.http.errors import ApiError
from tests.serve.fakes import FakeEngine, make_context

req = ChatCompletionRequest.model_validate({{"model": "m", "messages": [{{"role": "user", "content": "x"}}],
                                            "k2ray_test": {{"script": "hi"}}}})
ctx = make_context({CKPT!r}, FakeEngine([]), allow_injection=False)
try:
    ctx.injection(req.k2ray_test)
    raise SystemExit("production accepted k2ray_test")
except ApiError as exc:
    assert exc.status == 400 and exc.param == "k2ray_test", exc
if {HOOKS!r} in sys.modules:
    raise SystemExit("a production path imported the test hooks")
injection = replace(ctx, allow_injection=True).injection(req.k2ray_test)
print(type(injection).__module__)
"""


def test_production_paths_never_import_the_test_hooks() -> None:
    done = subprocess.run([sys.executable, "-c", FENCE_CHECK], capture_output=True, text=True,
                          timeout=IMPORT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert done.stdout.split()[-1] == HOOKS  # and a test deployment does use them


async def test_k2ray_test_on_a_production_deployment_is_a_clear_400() -> None:
    engine = FakeEngine([1, 2, 3])
    app = build_router_app(make_context(CKPT, engine, allow_injection=False))
    user = [{"role": "user", "content": "x"}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        for path, body in (("/v1/chat/completions", {"messages": user, "max_tokens": 4}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 4}),
                           ("/v1/messages", {"messages": user, "max_tokens": 4})):
            resp = await http.post(path, json={"model": "k2-tiny", **body, "k2ray_test": {"script": "hi"}})
            assert resp.status_code == 400, (path, resp.text)
            assert "k2ray_test" in resp.text and "Traceback" not in resp.text
    assert engine.started == []


async def test_a_malformed_k2ray_test_is_a_400_naming_the_field() -> None:
    app = build_router_app(make_context(CKPT, FakeEngine([1, 2, 3]), allow_injection=True))
    body = {"model": "k2-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "k2ray_test": {"token_delay_s": 5}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400 and "k2ray_test.token_delay_s" in resp.json()["error"]["message"]


def test_rounds_script_each_round_of_a_tool_loop() -> None:
    from k2ray.api.tokenizer import K2Tokenizer
    from k2ray.serve.test_hooks import parse_injection

    tokenizer = K2Tokenizer.from_pretrained(tiny_checkpoint_dir())
    first, second = "call<|im_end|>", "answer<|im_end|>"
    injection = parse_injection({"rounds": [first, second], "fail_round": 1, "fail_after_tokens": 2}, tokenizer)
    assert injection.script_token_ids == tuple(tokenizer.encode(first)) and injection.fail_after_tokens is None
    later = injection.for_round(1)
    assert later.script_token_ids == tuple(tokenizer.encode(second)) and later.fail_after_tokens == 2
    assert injection.for_round(2).script_token_ids == later.script_token_ids  # the last script repeats
    assert injection.for_round(2).fail_after_tokens is None
    every = parse_injection({"script": first, "fail_after_tokens": 1}, tokenizer)
    assert every.for_round(3).script_token_ids == every.script_token_ids and every.for_round(3).fail_after_tokens == 1
