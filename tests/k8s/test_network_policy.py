"""The NetworkPolicy, evaluated the way Kubernetes does for the peers that matter: clients reach only the
HTTP port; the release's Ray pods reach each other on every port (Ray's and k2ray's run-time ports:
delta channel, KV transfer, object manager); the operator only the dashboard; Prometheus only metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from .chart import NAMESPACE, only, pod_templates, render

# Ports a Ray pod listens on: Serve's HTTP, GCS, dashboard, dashboard agent, metrics, and an ephemeral
# one such as the delta channel's or a KV-transfer listener.
HTTP, GCS, DASHBOARD, AGENT, METRICS, EPHEMERAL = 8000, 6379, 8265, 52365, 8080, 41234


@dataclass(frozen=True)
class Peer:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.namespace_labels.setdefault("kubernetes.io/metadata.name", self.namespace)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the only form the chart renders
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(rule_peer: dict, peer: Peer) -> bool:
    assert "ipBlock" not in rule_peer
    pods, namespaces = rule_peer.get("podSelector"), rule_peer.get("namespaceSelector")
    if namespaces is None and peer.namespace != NAMESPACE:
        return False  # a bare podSelector means pods of the policy's own namespace
    return (pods is None or _selects(pods, peer.labels)) and \
        (namespaces is None or _selects(namespaces, peer.namespace_labels))


def _port_matches(rule_port: dict, port: int, named_ports: dict[str, int]) -> bool:
    wanted = rule_port["port"]
    return (named_ports.get(wanted) if isinstance(wanted, str) else wanted) == port


def admits(policy: dict, target: dict, peer: Peer, port: int) -> bool:
    """Whether `policy` lets `peer` open TCP `port` on a pod with pod template `target`."""
    spec = policy["spec"]
    assert _selects(spec["podSelector"], target["metadata"]["labels"])
    (container,) = target["spec"]["containers"]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for rule in spec["ingress"]:
        peers_ok = "from" not in rule or any(_peer_matches(p, peer) for p in rule["from"])
        ports_ok = "ports" not in rule or any(_port_matches(p, port, named_ports) for p in rule["ports"])
        if peers_ok and ports_ok:
            return True
    return False


def _release(values=None) -> tuple[dict, dict[str, dict]]:
    docs = render(values)
    return only(docs, "NetworkPolicy"), pod_templates(only(docs, "RayService"))


def _own_pod(templates: dict[str, dict], group: str) -> Peer:
    return Peer(NAMESPACE, dict(templates[group]["metadata"]["labels"]))


CLIENT = Peer("apps", {"app": "chat-ui"})
OTHER_RELEASE = Peer(NAMESPACE, {"app.kubernetes.io/name": "k2ray", "app.kubernetes.io/instance": "other"})
OPERATOR = Peer("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})


@pytest.mark.parametrize("group", ["head", "router", "colocated"])
def test_who_reaches_which_port(group):
    policy, templates = _release()
    target = templates[group]
    assert [p for p in (HTTP, GCS, DASHBOARD, METRICS, EPHEMERAL) if admits(policy, target, CLIENT, p)] == [HTTP]
    assert admits(policy, target, OTHER_RELEASE, HTTP)
    assert not admits(policy, target, OTHER_RELEASE, EPHEMERAL)
    for source in ("head", "router", "colocated"):
        own = _own_pod(templates, source)
        assert all(admits(policy, target, own, p) for p in (HTTP, GCS, DASHBOARD, AGENT, METRICS, EPHEMERAL))
    # The release's labels in another namespace are not the release.
    impostor = Peer("elsewhere", _own_pod(templates, "router").labels)
    assert not admits(policy, target, impostor, EPHEMERAL)
    assert [p for p in (HTTP, GCS, DASHBOARD, AGENT, EPHEMERAL) if admits(policy, target, OPERATOR, p)] == \
        [HTTP, DASHBOARD, AGENT]
    assert [p for p in (GCS, METRICS, EPHEMERAL) if admits(policy, target, PROMETHEUS, p)] == [METRICS]


def test_clients_can_be_narrowed_to_a_gateway():
    gateway = Peer("gateway", {"app": "envoy"})
    values = {"networkPolicy": {"clients": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "gateway"}}}]}}
    policy, templates = _release(values)
    assert admits(policy, templates["router"], gateway, HTTP)
    assert not admits(policy, templates["router"], CLIENT, HTTP)
    assert not admits(policy, templates["router"], gateway, EPHEMERAL)


def test_no_scrape_rule_without_the_pod_monitor():
    policy, templates = _release({"metrics": {"podMonitor": {"enabled": False}}})
    assert not admits(policy, templates["head"], PROMETHEUS, METRICS)
