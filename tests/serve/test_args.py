"""ServeArgs from the shipped YAML, dicts and CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from k2ray.model.default_checkpoint import default_checkpoint_dir
from k2ray.serve.args import RequestLimits, load_serve_args

LOCAL_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve" / "local.yaml"


def test_local_yaml_loads_with_defaults():
    args = load_serve_args(LOCAL_YAML)
    assert args.model_dir == str(default_checkpoint_dir()) and args.model_name == "k2-tiny"
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.engine.max_model_len == 4096 and not args.testing.allow_injection


def test_overrides_and_validation():
    args = load_serve_args(LOCAL_YAML, port=9001, model="/ckpt/k2")
    assert (args.port, args.model_name) == (9001, "k2")
    with pytest.raises(ValidationError):
        load_serve_args({"engine": {"block_size": 0}})
    with pytest.raises(ValidationError):
        load_serve_args({"engine": {"no_such_knob": 1}})


def test_engine_config_from_args():
    pytest.importorskip("torch")
    from k2ray.serve.engine.engine_server import engine_config

    config = engine_config(load_serve_args({"engine": {"max_model_len": 512, "block_size": 32}}))
    assert (config.max_model_len, config.block_size, config.skip_tokenizer_init) == (512, 32, True)


def test_direct_ingress_pins_the_configured_port():
    assert load_serve_args(LOCAL_YAML, direct_ingress=False).ingress_env_vars == {}
    args = load_serve_args(LOCAL_YAML, port=9001, direct_ingress=True)
    env = args.ingress_env_vars
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray's port range excludes its maximum: exactly the configured port is handed out.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "9001", "9002")
    with pytest.raises(ValidationError):
        load_serve_args({"direct_ingress": True, "router": {"num_replicas": 2}})
    with pytest.raises(ValidationError):
        load_serve_args({"direct_ingress": True, "port": 0})


def test_request_limits_load_from_the_router_section():
    args = load_serve_args({"router": {"limits": {"max_body_bytes": 1024, "max_n": 4}}})
    assert (args.router.limits.max_body_bytes, args.router.limits.max_n) == (1024, 4)
    assert args.router.limits.max_prompts == RequestLimits().max_prompts
    with pytest.raises(ValidationError):
        load_serve_args({"router": {"limits": {"max_json_depth": 0}}})
    with pytest.raises(ValidationError):
        load_serve_args({"router": {"limits": {"no_such_limit": 1}}})
