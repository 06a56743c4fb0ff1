"""The rendered manifests against Kubernetes' schemas (kubernetes-validate) and the RayService CRD's
OpenAPI schema (tests/k8s/data, KubeRay commit noted there)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .chart import pod_templates, render

# The oldest Kubernetes minor still supported upstream when this was written, and the newest
# kubernetes-validate bundles; Chart.yaml's kubeVersion admits both.
KUBE_VERSIONS = ("1.33.0", "1.37.0")
CRD_SCHEMA = Path(__file__).parent / "data" / "rayservice_v1_openapi.yaml"
VALUE_SETS = {
    "colocated-default": None,
    "auth-off": {"auth": {"enabled": False}},
    "billing-off": {"auth": {"enabled": False}, "billing": {"enabled": False}},
    "disaggregated": {"disaggregated": True, "prefill": {"replicas": 2}, "decode": {"replicas": 2}},
    "k2-on-h200": {
        "model": {"path": "/models/Kimi-K2-Thinking", "pvc": {"claimName": "k2-weights"}},
        "colocated": {"replicas": 2, "gpusPerWorker": 8,
                      "resources": {"requests": {"cpu": "96", "memory": "1500Gi"}, "limits": {"memory": "1500Gi"}},
                      "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
        "billing": {"ledger": {"serviceFileSecret": {"name": "ledger", "key": "pg_service"}}},
        "search": {"provider": "searxng", "searxng": {"baseUrl": "http://searxng.search:8080"}},
        "networkPolicy": {"clients": [{"namespaceSelector": {"matchLabels": {"name": "gateway"}}}]},
        "head": {"rayStartParams": {"object-store-memory": 10_000_000_000}},
    },
}


def _strict(schema: Any) -> Any:
    """The CRD schema as `kubectl apply --validate=strict` reads it: unknown fields are errors wherever the
    schema lists properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    schema = yaml.safe_load(CRD_SCHEMA.read_text())["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def _crd_errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _as_pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": name},
            "spec": template["spec"]}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_builtin_kinds_and_pod_templates_are_valid_kubernetes(value_set, kube_version):
    docs = render(VALUE_SETS[value_set])
    builtin = [doc for doc in docs if doc["apiVersion"] in ("v1", "networking.k8s.io/v1")]
    assert {doc["kind"] for doc in builtin} == {"Service", "NetworkPolicy", "ConfigMap"}  # ConfigMap: dashboards
    (rayservice,) = [doc for doc in docs if doc["kind"] == "RayService"]
    pods = [_as_pod(name, t) for name, t in pod_templates(rayservice).items()]
    for doc in builtin + pods:
        kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_rayservice_matches_the_crd_schema(value_set, crd_validator):
    (rayservice,) = [doc for doc in render(VALUE_SETS[value_set]) if doc["kind"] == "RayService"]
    assert _crd_errors(crd_validator, rayservice) == []


def test_crd_check_catches_what_the_api_server_would_refuse(crd_validator):
    """The checks above can fail: a number in rayStartParams (the CRD takes strings only), a field the CRD
    does not have, and a pod template KubeRay could not run."""
    (rayservice,) = [doc for doc in render() if doc["kind"] == "RayService"]
    numeric = copy.deepcopy(rayservice)
    numeric["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    unknown = copy.deepcopy(rayservice)
    unknown["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["gpus"] = 8
    no_containers = copy.deepcopy(rayservice)
    del no_containers["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert any("is not of type 'string'" in e for e in _crd_errors(crd_validator, numeric))
    assert any("'gpus' was unexpected" in e for e in _crd_errors(crd_validator, unknown))
    assert any("'containers' is a required property" in e for e in _crd_errors(crd_validator, no_containers))
    bad_pod = _as_pod("head", pod_templates(rayservice)["head"])
    bad_pod["spec"]["containers"][0]["ports"][0]["containerPort"] = "gcs"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_pod, KUBE_VERSIONS[0], strict=True)


def test_ray_start_params_are_strings_even_from_numbers():
    (rayservice,) = [doc for doc in render(VALUE_SETS["k2-on-h200"]) if doc["kind"] == "RayService"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["object-store-memory"] == "10000000000"
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0"
