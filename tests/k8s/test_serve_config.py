"""The rendered serveConfigV2 is a Ray Serve config Ray accepts (ServeDeploySchema) whose application
args are a ServeArgs k2ray accepts, with what the values asked for."""

from __future__ import annotations

import json

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from k2ray.serve.args import LOCAL_RAY_ENV_VARS, EngineArgs, RouterArgs, ServeArgs, load_serve_args

from .chart import CHART_DIR, container_env, only, pod_templates, render, serve_config

# Fields the chart derives (engine: from the colocated pool; router: from `auth`, secrets only from
# Secrets) instead of taking them as options.
POOL_FIELDS = {"num_replicas", "num_gpus", "resources", "ep_size"}  # set per worker group (and epSize) by the chart
AUTH_FIELDS = {"auth", "admin_token", "admin_token_file"}
K2_VALUES = {
    "model": {"path": "/models/Kimi-K2-Thinking", "servedModelName": "kimi-k2-thinking",
              "pvc": {"claimName": "k2-weights"}},
    "colocated": {"replicas": 3, "gpusPerWorker": 8},
    "engine": {"max_model_len": 262144, "max_num_seqs": 128, "kv_cache_memory_bytes": 100_000_000_000,
               "kernel_backend": "triton"},
    "router": {"num_replicas": 2, "engine_transport": "grpc", "limits": {"max_body_bytes": 16_777_216}},
    "serve": {"port": 8080 + 1, "routePrefix": "/k2", "logLevel": "INFO"},
}


def _serve_args(values=None) -> tuple[dict, ServeArgs]:
    config = serve_config(only(render(values), "RayService"))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    return config, ServeArgs.model_validate(app["args"])


@pytest.mark.parametrize("values", [None, {"auth": {"enabled": False}}, K2_VALUES],
                         ids=["colocated-default", "auth-off", "k2"])
def test_serve_config_is_accepted_by_ray_and_by_k2ray(values, tmp_path):
    config, args = _serve_args(values)
    (app,) = config["applications"]
    assert app["import_path"] == "k2ray.serve.app:build_app"
    # `k2ray serve --config` reads the same document through load_serve_args.
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_serve_args(path) == args


def test_values_reach_serve_args():
    config, args = _serve_args(K2_VALUES)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8081}
    assert (args.model, args.model_name, args.route_prefix, args.log_level) == \
        ("/models/Kimi-K2-Thinking", "kimi-k2-thinking", "/k2", "INFO")
    assert (args.engine.num_replicas, args.engine.num_gpus) == (3, 8)
    assert (args.engine.max_model_len, args.engine.max_num_seqs, args.engine.kernel_backend) == \
        (262144, 128, "triton")
    assert args.engine.kv_cache_memory_bytes == 100_000_000_000
    assert (args.router.num_replicas, args.router.engine_transport) == (2, "grpc")
    assert args.router.limits.max_body_bytes == 16_777_216


def test_default_serves_the_embedded_checkpoint_with_k2ray_defaults_elsewhere():
    _, args = _serve_args()
    assert args.model is None
    assert args.engine.max_num_seqs == 64  # values.yaml
    assert args.engine.env_vars == EngineArgs().env_vars  # not set by the chart: k2ray's default


def test_model_pvc_is_mounted_read_only_where_the_model_path_points():
    rayservice = only(render(K2_VALUES), "RayService")
    for template in pod_templates(rayservice).values():
        (container,) = template["spec"]["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "k2-weights", "readOnly": True}
    assert "model" not in {v["name"] for v in pod_templates(only(render(), "RayService"))["colocated"]["spec"]["volumes"]}


def test_one_worker_group_per_pool_with_its_gpus_and_placement():
    values = {"colocated": {"replicas": 2, "gpusPerWorker": 8, "nodeSelector": {"pool": "h200"},
                            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "k2",
                                             "effect": "NoSchedule"}]}}
    cluster = only(render(values), "RayService")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["colocated", "router"]
    colocated = groups["colocated"]
    assert (colocated["replicas"], colocated["minReplicas"], colocated["maxReplicas"]) == (2, 2, 2)
    assert colocated["rayStartParams"]["num-gpus"] == "8"
    (container,) = colocated["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert colocated["template"]["spec"]["nodeSelector"] == {"pool": "h200"}
    assert colocated["template"]["spec"]["tolerations"][0]["value"] == "k2"
    (router,) = groups["router"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in router["resources"]["limits"]
    assert groups["router"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head


def test_values_schema_engine_and_router_options_are_serve_args_fields():
    """values.schema.json may not admit an option ServeArgs would refuse (or miss one it takes)."""
    properties = json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]
    assert set(properties["engine"]["properties"]) == set(EngineArgs.model_fields) - POOL_FIELDS
    assert set(properties["router"]["properties"]) == set(RouterArgs.model_fields) - AUTH_FIELDS
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(values["engine"]) <= set(EngineArgs.model_fields) - POOL_FIELDS
    assert set(values["router"]) <= set(RouterArgs.model_fields) - AUTH_FIELDS


def test_ray_containers_get_the_environment_k2ray_serve_gives_its_own_ray():
    rayservice = only(render(), "RayService")
    for template in pod_templates(rayservice).values():
        env = container_env(template)
        assert {name: env[name]["value"] for name in LOCAL_RAY_ENV_VARS} == LOCAL_RAY_ENV_VARS


PD_VALUES = {"disaggregated": True, "prefill": {"replicas": 2, "gpusPerWorker": 8},
             "decode": {"replicas": 3, "gpusPerWorker": 8}, "pd": {"local_prefill_threshold": 512}}


def test_disaggregated_pools_get_their_own_worker_groups_and_serve_args():
    config, args = _serve_args(PD_VALUES)
    assert args.disaggregated and args.pd.local_prefill_threshold == 512
    prefill, decode = args.pool_engine("prefill"), args.pool_engine("decode")
    assert (prefill.num_replicas, prefill.num_gpus, prefill.resources) == (2, 8, {"k2ray_prefill": 1})
    assert (decode.num_replicas, decode.num_gpus, decode.resources) == (3, 8, {"k2ray_decode": 1})
    cluster = only(render(PD_VALUES), "RayService")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["decode", "prefill", "router"]
    assert (groups["prefill"]["replicas"], groups["decode"]["replicas"]) == (2, 3)
    # KubeRay passes the value to `ray start --resources=...` through a shell: quoted JSON.
    assert groups["prefill"]["rayStartParams"]["resources"] == '"{\\"k2ray_prefill\\": 1}"'
    assert "resources" not in groups["router"]["rayStartParams"]


PD_EP_VALUES = {**PD_VALUES, "epSize": 4}


def test_disaggregated_with_ep_shares_each_pools_gpus_among_its_ranks():
    """epSize 4 over 8-GPU pods: every replica of both pools is 4 ranks of 2 GPUs each."""
    _, args = _serve_args(PD_EP_VALUES)
    for pool in ("prefill", "decode"):
        engine = args.pool_engine(pool)
        assert (engine.ep_size, engine.num_gpus) == (4, 2)
        assert engine.num_gpus * engine.ep_size == PD_VALUES[pool]["gpusPerWorker"]
    groups = {g["groupName"]: g for g in only(render(PD_EP_VALUES), "RayService")["spec"]["rayClusterConfig"]
              ["workerGroupSpecs"]}
    assert groups["prefill"]["rayStartParams"]["num-gpus"] == "8"


def test_colocated_ep_size_reaches_the_engine():
    _, args = _serve_args({"colocated": {"replicas": 1, "gpusPerWorker": 8}, "epSize": 8})
    assert (args.engine.ep_size, args.engine.num_gpus) == (8, 1)
