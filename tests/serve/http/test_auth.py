"""API keys on every /v1 route (Bearer and x-api-key), 401 in the route's own shape, the verified-key cache,
and the admin token on /admin/."""

from __future__ import annotations

import anthropic
import httpx2
import openai
import pytest

from k2ray.api.tokenizer import K2Tokenizer

from .billed_app import ADMIN_TOKEN, CKPT, billed_app

CHAT = {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
MESSAGES = {"model": "k2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}


@pytest.fixture(scope="module")
def tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(CKPT)


@pytest.fixture
def billed(tokenizer, tmp_path):
    app = billed_app(tokenizer, tmp_path)
    yield app
    app.billing.close()


@pytest.mark.parametrize("secret", [None, "sk-nope", "sk-0123456789abcdef.wrong", "not-a-key"])
async def test_missing_or_wrong_key_is_401_in_each_api_shape(billed, secret):
    async with billed.http(secret) as http:
        chat = await http.post("/v1/chat/completions", json=CHAT)
        models = await http.get("/v1/models")
        usage = await http.get("/v1/usage")
    async with billed.http(secret, header="x-api-key") as http:
        msg = await http.post("/v1/messages", json=MESSAGES)
    for resp in (chat, models, usage):
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert msg.status_code == 401
    assert msg.json() == {"type": "error", "error": {"type": "authentication_error", "message": msg.json()["error"]["message"]}}
    assert billed.engine.started == []
    assert await billed.records() == 0  # nothing ran, nothing is billed


async def test_sdks_authenticate_with_bearer_and_x_api_key(billed):
    _, secret = billed.create_key()
    client = openai.AsyncOpenAI(base_url="http://router/v1", api_key=secret, http_client=billed.http(),
                                max_retries=0)
    chat = await client.chat.completions.create(**CHAT)
    assert chat.choices[0].message.content == "Hi there"
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=billed.app), base_url="http://router")
    claude = anthropic.AsyncAnthropic(base_url="http://router", api_key=secret, http_client=http, max_retries=0)
    msg = await claude.messages.create(**MESSAGES)
    assert msg.content[-1].text == "Hi there"
    bad = openai.AsyncOpenAI(base_url="http://router/v1", api_key="sk-bad.key", http_client=billed.http(),
                             max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(**CHAT)


async def test_revoked_key_is_401_at_once_through_the_admin_api(billed):
    key, secret = billed.create_key()
    async with billed.http(secret) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        async with billed.http(ADMIN_TOKEN) as admin:
            revoked = await admin.post(f"/admin/keys/{key.key_id}/revoke")
            again = await admin.post(f"/admin/keys/{key.key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json() == {"key_id": key.key_id, "revoked": True}
        assert again.status_code == 404
        resp = await http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 401


async def test_verified_keys_are_cached_for_the_ttl(billed):
    key, secret = billed.create_key()
    async with billed.http(secret) as http:
        assert (await http.get("/v1/models")).status_code == 200
        billed.billing.keys.revoke(key.key_id)  # as another replica would: this one's cache still holds it
        assert (await http.get("/v1/models")).status_code == 200
        billed.clock.now += billed.auth.ttl_s + 1
        assert (await http.get("/v1/models")).status_code == 401


async def test_auth_off_serves_without_a_key_and_meters_to_anonymous(tokenizer, tmp_path):
    billed = billed_app(tokenizer, tmp_path, is_auth_on=False)
    try:
        async with billed.http() as http:
            resp = await http.post("/v1/chat/completions", json=CHAT)
            usage = await http.get("/v1/usage")
        assert resp.status_code == 200
        assert (await billed.record(resp.json()["id"])).key_id == "anonymous"
        assert usage.json()["totals"]["requests"] == 1
    finally:
        billed.billing.close()


async def test_admin_routes_need_the_admin_token(billed):
    _, secret = billed.create_key()
    for token in (None, "wrong-token", secret):  # an API key is no admin token
        async with billed.http(token) as http:
            for resp in (await http.get("/admin/keys"), await http.get("/admin/usage"),
                         await http.post("/admin/keys", json={"name": "x"})):
                assert resp.status_code == 401, resp.text
                assert resp.json()["error"]["type"] == "invalid_request_error"
    assert len(billed.billing.keys.list()) == 1


async def test_admin_api_is_404_without_a_configured_token(tokenizer, tmp_path):
    billed = billed_app(tokenizer, tmp_path, admin_token=None)
    try:
        async with billed.http("anything") as http:
            resp = await http.get("/admin/keys")
        assert resp.status_code == 404
        assert "no admin token is configured" in resp.json()["error"]["message"]
    finally:
        billed.billing.close()


async def test_admin_creates_lists_and_revokes_keys(billed):
    async with billed.http(ADMIN_TOKEN) as admin:
        created = await admin.post("/admin/keys", json={"name": "team-a", "rpm": 5, "budget_usd": "1.25"})
        bad_plan = await admin.post("/admin/keys", json={"name": "x", "plan": "nope"})
        bad_money = await admin.post("/admin/keys", json={"name": "x", "budget_usd": "1.0000000000001"})
        listed = await admin.get("/admin/keys")
    assert created.status_code == 201
    body = created.json()
    assert body["secret"].startswith("sk-") and body["key"]["budget_usd"] == "1.25" and body["key"]["rpm"] == 5
    assert bad_plan.status_code == 400 and bad_money.status_code == 400
    assert [k["key_id"] for k in listed.json()["data"]] == [body["key"]["key_id"]]
    assert body["secret"] not in listed.text
    async with billed.http(body["secret"]) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
