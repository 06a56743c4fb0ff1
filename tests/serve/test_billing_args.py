"""The billing fields of ServeArgs: `billing`, `router.auth`, the admin token (never shown), the key cache."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2ray.serve.args import load_serve_args
from k2ray.serve.http.auth import read_admin_token


def test_auth_needs_a_billing_section():
    with pytest.raises(ValidationError, match="router.auth needs a billing section"):
        load_serve_args({"router": {"auth": True}})
    args = load_serve_args({"router": {"auth": True}, "billing": {"ledger": "/tmp/x.db", "default_plan": "moonshot"}})
    assert args.router.auth and args.billing.ledger == "/tmp/x.db" and args.billing.plan(None)[0] == "moonshot"


def test_defaults_keep_auth_and_metering_off():
    args = load_serve_args({})
    assert not args.router.auth and args.billing is None and args.router.admin_token is None
    assert not load_serve_args("deploy/serve/local.yaml").router.auth


def test_admin_token_is_never_shown(tmp_path):
    args = load_serve_args({"router": {"admin_token": "top-secret"}})
    assert "top-secret" not in repr(args) and "top-secret" not in str(args.model_dump())
    assert args.router.admin_token.get_secret_value() == "top-secret"
    token_file = tmp_path / "admin-token"
    token_file.write_text("from-a-file\n")
    assert read_admin_token(None, str(token_file)) == "from-a-file"
    assert read_admin_token("inline", str(token_file)) == "inline"
    assert read_admin_token(None, None) is None
