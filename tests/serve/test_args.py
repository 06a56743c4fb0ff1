"""ServeArgs from the shipped YAML, dicts and CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from k2ray.model.default_checkpoint import default_checkpoint_dir
from k2ray.serve.args import (
    DEFAULT_MODELS,
    STANDARD_PRIORITY,
    TURBO_PRIORITY,
    RequestLimits,
    ServedModel,
    load_serve_args,
)

REPO = Path(__file__).resolve().parents[2]
LOCAL_YAML = REPO / "deploy" / "serve" / "local.yaml"


def test_local_yaml_loads_with_defaults():
    args = load_serve_args(LOCAL_YAML)
    assert args.model_dir == str(default_checkpoint_dir()) and args.model_name == "kimi-k2-thinking"
    assert args.served_models == DEFAULT_MODELS
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.engine.max_model_len == 4096 and not args.testing.allow_injection


def test_overrides_and_validation():
    args = load_serve_args(LOCAL_YAML, port=9001, model="/ckpt/k2")
    assert (args.port, args.model_dir, args.model_name) == (9001, "/ckpt/k2", "kimi-k2-thinking")
    with pytest.raises(ValidationError):
        load_serve_args({"engine": {"block_size": 0}})
    with pytest.raises(ValidationError):
        load_serve_args({"engine": {"no_such_knob": 1}})


def test_engine_config_from_args():
    pytest.importorskip("torch")
    from k2ray.serve.engine.core_replica import engine_config

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


def test_served_models_default_to_standard_and_turbo():
    standard, turbo = load_serve_args({}).served_models
    assert (standard.id, standard.plan, standard.priority) == ("kimi-k2-thinking", "moonshot", STANDARD_PRIORITY)
    assert (turbo.id, turbo.plan, turbo.priority) == ("kimi-k2-thinking-turbo", "moonshot-turbo", TURBO_PRIORITY)
    assert turbo.priority < standard.priority  # lower is scheduled first


def test_served_model_name_serves_that_one_id():
    args = load_serve_args({"served_model_name": "k2-tiny"})
    assert args.served_models == (ServedModel(id="k2-tiny", plan=None, priority=STANDARD_PRIORITY),)
    assert args.model_name == "k2-tiny"


def test_served_model_name_on_the_command_line_replaces_the_configs_ids():
    from k2ray.serve.launcher import launch_args

    args = launch_args(config_path=LOCAL_YAML, port=9002, served_model_name="k2-demo")
    assert args.served_models == (ServedModel(id="k2-demo", plan=None, priority=STANDARD_PRIORITY),)
    assert args.port == 9002 and args.direct_ingress and args.engine.max_model_len == 4096
    assert launch_args(config_path=LOCAL_YAML).served_models == DEFAULT_MODELS


def test_models_list_is_validated():
    args = load_serve_args({"models": [{"id": "fast", "plan": "evolink", "priority": -5}, {"id": "slow"}]})
    assert [(m.id, m.plan, m.priority) for m in args.served_models] == [("fast", "evolink", -5), ("slow", None, 0)]
    assert load_serve_args(args).served_models == args.served_models  # survives a round trip
    for bad, message in [
        ({"models": [{"id": "a"}], "served_model_name": "b"}, "not both"),
        ({"models": [{"id": "a"}, {"id": "a"}]}, "distinct"),
        ({"models": [{"id": "a", "plan": "nope"}]}, "'nope' is not a price plan"),
        ({"models": []}, "at least 1"),
        ({"models": [{"id": ""}]}, "at least 1"),
        ({"models": [{"id": "a", "speed": "turbo"}]}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=message):
            load_serve_args(bad)


def test_a_plan_from_the_billing_section_is_accepted():
    plan = {"input_micro_usd_per_mtok": 1, "cached_input_micro_usd_per_mtok": 1, "output_micro_usd_per_mtok": 1,
            "web_search_micro_usd": 1}
    args = load_serve_args({"models": [{"id": "a", "plan": "house"}], "billing": {"plans": {"house": plan}}})
    assert args.served_models[0].plan == "house"


def test_disaggregated_pools_update_the_engine_section():
    args = load_serve_args({"engine": {"num_cpus": 0.5, "block_size": 8}, "disaggregated": True,
                            "prefill": {"num_replicas": 2, "max_num_seqs": 4}, "decode": {"cpu_affinity": [1]}})
    prefill, decode = args.pool_engine("prefill"), args.pool_engine("decode")
    assert (prefill.num_replicas, prefill.max_num_seqs, prefill.block_size, prefill.num_cpus) == (2, 4, 8, 0.5)
    assert (decode.num_replicas, decode.cpu_affinity, decode.block_size) == (1, [1], 8)
    with pytest.raises(ValidationError, match="bogus"):
        load_serve_args({"prefill": {"bogus": 1}})
    with pytest.raises(ValidationError, match="engine_transport"):
        load_serve_args({"disaggregated": True, "router": {"engine_transport": "grpc"}})
    for config in ("deploy/serve/pd.yaml", "deploy/serve/pd-2x2.yaml"):
        pools = load_serve_args(REPO / config)
        assert pools.disaggregated and pools.pool_engine("prefill").num_replicas == pools.pool_engine("decode").num_replicas
