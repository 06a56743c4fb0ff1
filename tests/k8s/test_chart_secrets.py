"""Auth, the admin token and the ledger: on by default, from Secrets mounted as files, never inline in
serveConfigV2; the rendered ledger DSN plus the Secret's service file reach a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from billing.postgres_server import INSTALL_HINT, find_bin_dir, postgres_server
from sqlalchemy.engine import make_url

from k2ray.billing.db import make_engine
from k2ray.serve.args import ServeArgs

from .chart import container_env, only, pod_templates, render, render_notes, serve_config

AUTH_OFF = {"auth": {"enabled": False}}
BILLING_OFF = {"auth": {"enabled": False}, "billing": {"enabled": False}}


def _release(values=None) -> tuple[dict, ServeArgs]:
    rayservice = only(render(values), "RayService")
    (app,) = serve_config(rayservice)["applications"]
    return rayservice, ServeArgs.model_validate(app["args"])


def _mounted_file(template: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) that the container sees at `path`."""
    (container,) = template["spec"]["containers"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/") and "secret" in volumes[mount["name"]]:
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            relative = path.removeprefix(mount["mountPath"] + "/")
            (item,) = [i for i in secret["items"] if i["path"] == relative]
            return secret["secretName"], item["key"]
    raise AssertionError(f"nothing mounted at {path}")


def test_auth_is_on_by_default_with_the_admin_token_from_a_secret():
    rayservice, args = _release()
    assert args.router.auth is True and args.billing is not None
    assert args.router.admin_token is None  # never inline
    for template in pod_templates(rayservice).values():
        assert _mounted_file(template, args.router.admin_token_file) == ("demo-k2ray-admin", "token")
    assert "Auth is on" in render_notes()


def test_auth_off_mounts_no_admin_token():
    rayservice, args = _release(AUTH_OFF)
    assert args.router.auth is False and args.router.admin_token_file is None
    for template in pod_templates(rayservice).values():
        assert "admin-token" not in {v["name"] for v in template["spec"]["volumes"]}
    assert "Auth is OFF" in render_notes(AUTH_OFF)


def test_ledger_connection_comes_only_from_the_secret():
    values = {"billing": {"ledger": {"service": "ledger-prod",
                                     "serviceFileSecret": {"name": "pg", "key": "services.conf"}}}}
    rayservice, args = _release(values)
    url = make_url(args.billing.ledger)
    assert not (url.host or url.port or url.username or url.password or url.database)
    assert url.query == {"service": "ledger-prod"}
    for template in pod_templates(rayservice).values():
        service_file = container_env(template)["PGSERVICEFILE"]["value"]
        assert _mounted_file(template, service_file) == ("pg", "services.conf")


def test_billing_off_has_no_ledger():
    rayservice, args = _release(BILLING_OFF)
    assert args.billing is None
    for template in pod_templates(rayservice).values():
        assert "PGSERVICEFILE" not in container_env(template)


def test_price_plans_and_variants_reach_serve_args():
    plan = {"input_micro_usd_per_mtok": 1, "cached_input_micro_usd_per_mtok": 1,
            "output_micro_usd_per_mtok": 2, "web_search_micro_usd": 3}
    values = {"models": [{"id": "k2", "plan": "house", "priority": 0},
                         {"id": "k2-turbo", "plan": "moonshot-turbo", "priority": -1}],
              "billing": {"defaultPlan": "house", "plans": {"house": plan}}}
    _, args = _release(values)
    assert [(m.id, m.plan, m.priority) for m in args.served_models] == \
        [("k2", "house", 0), ("k2-turbo", "moonshot-turbo", -1)]
    assert args.billing.default_plan == "house"
    assert args.billing.plan("house")[1].output_micro_usd_per_mtok == 2


def test_a_variant_on_an_unknown_plan_is_refused_by_k2ray():
    with pytest.raises(ValueError, match="is not a price plan"):
        _release({"models": [{"id": "k2", "plan": "free-lunch"}]})


def test_rendered_ledger_dsn_and_service_file_reach_postgresql(tmp_path: Path, monkeypatch):
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")
    rayservice, args = _release()
    service_file = container_env(pod_templates(rayservice)["router"])["PGSERVICEFILE"]["value"]
    with postgres_server(bin_dir) as server_dsn:
        server = make_url(server_dsn)
        # What the operator puts in the Secret; the pod sees it at service_file.
        local_copy = tmp_path / Path(service_file).name
        local_copy.write_text(f"[k2ray-ledger]\nhost={server.host}\nport={server.port}\n"
                              f"dbname={server.database}\nuser={server.username}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(local_copy))
        engine = make_engine(args.billing.ledger)
        try:
            with engine.connect() as conn:
                port = conn.exec_driver_sql("SELECT inet_server_port()").scalar_one()
        finally:
            engine.dispose()
    assert port == server.port
