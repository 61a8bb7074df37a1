"""When the operator re-applies a child: only when what it owns of it drifted."""

from __future__ import annotations

import copy

from kubeforge.operator import children as ch
from kubeforge.operator.manifests import router_identity, router_objects

BODY = {
    "apiVersion": "kubeforge.dev/v1alpha1",
    "kind": "Service",
    "metadata": {"name": "svc", "namespace": "ns", "uid": "u"},
    "spec": {"actor": "examples.echo:Echo"},
}


def _wanted() -> list[dict]:
    return [*router_identity(BODY), *router_objects(BODY)]


def _as_stored(obj: dict) -> dict:
    """What the API server gives back: defaults filled in, server fields added."""
    live = copy.deepcopy(obj)
    live["metadata"].update(uid="x", resourceVersion="7", managedFields=[{"manager": "m"}])
    if live["kind"] == "Service":
        live["spec"]["clusterIP"] = "10.0.0.9"
        for port in live["spec"]["ports"]:
            port["protocol"] = "TCP"
    if live["kind"] == "Deployment":
        live["spec"]["strategy"] = {"type": "RollingUpdate"}
        live["status"] = {"readyReplicas": 1}
    return live


def test_nothing_to_apply_when_every_child_is_as_wanted() -> None:
    wanted = _wanted()
    live = {(o["kind"], o["metadata"]["name"]): ch.fingerprint(_as_stored(o)) for o in wanted}
    assert [(k, n) for k, n in ((o["kind"], o["metadata"]["name"]) for o in wanted)] == [
        ("ServiceAccount", "svc-router"),
        ("Role", "svc-router"),
        ("RoleBinding", "svc-router"),
        ("Deployment", "svc-router"),
        ("Service", "svc-router"),
    ]
    assert ch.drifted(wanted, live) == []


def test_missing_and_drifted_children_are_applied() -> None:
    wanted = _wanted()
    live = {(o["kind"], o["metadata"]["name"]): ch.fingerprint(_as_stored(o)) for o in wanted}
    del live[("RoleBinding", "svc-router")]  # deleted by someone
    role = _as_stored(wanted[1])
    role["rules"] = role["rules"][:1]  # edited by someone (or an older release's rules)
    live[("Role", "svc-router")] = ch.fingerprint(role)
    service = _as_stored(wanted[4])
    service["spec"]["ports"][0]["port"] = 9999
    live[("Service", "svc-router")] = ch.fingerprint(service)
    deployment = _as_stored(wanted[3])
    deployment["spec"]["replicas"] = 5  # scaled by hand
    live[("Deployment", "svc-router")] = ch.fingerprint(deployment)
    assert [o["kind"] for o in ch.drifted(wanted, live)] == [
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ]


def test_a_changed_router_setting_changes_the_deployment_fingerprint() -> None:
    before = ch.fingerprint(router_objects(BODY)[0])
    faster = {**BODY, "spec": {**BODY["spec"], "healthPollRate": "50ms"}}
    assert ch.fingerprint(router_objects(faster)[0]) != before


def test_replicas_take_connections_from_their_routers_and_their_group_only() -> None:
    from kubeforge.operator.manifests import network_policies

    replicas, router = network_policies(BODY)
    assert replicas["spec"]["podSelector"]["matchLabels"] == {
        "kubeforge.dev/service": "svc",
        "kubeforge.dev/component": "replica",
    }
    calls, group = replicas["spec"]["ingress"]
    assert calls["from"] == [
        {
            "podSelector": {
                "matchLabels": {"kubeforge.dev/service": "svc", "kubeforge.dev/component": "router"}
            }
        }
    ]
    assert calls["ports"] == [{"protocol": "TCP", "port": 8000}]  # the replica port
    assert group == {
        "from": [
            {
                "podSelector": {
                    "matchLabels": {
                        "kubeforge.dev/service": "svc",
                        "kubeforge.dev/component": "replica",
                    }
                }
            }
        ]
    }
    assert router["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    assert {p["spec"]["policyTypes"][0] for p in (replicas, router)} == {"Ingress"}


def test_network_policies_follow_the_spec_then_the_operators_default() -> None:
    from kubeforge.operator.manifests import network_policies

    scraper = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    clients = {"podSelector": {"matchLabels": {"role": "trainer"}}}
    body = copy.deepcopy(BODY)
    body["spec"]["networkPolicy"] = {"replicaFrom": [scraper], "routerFrom": [clients]}
    assert network_policies(body, on_by_default=False) == []  # unset: the operator's default
    assert len(network_policies(body)) == 2
    body["spec"]["networkPolicy"]["enabled"] = True
    replicas, router = network_policies(body, on_by_default=False)
    assert scraper in replicas["spec"]["ingress"][0]["from"]
    assert router["spec"]["ingress"][0]["from"] == [clients]
    body["spec"]["networkPolicy"]["enabled"] = False
    assert network_policies(body) == []


def test_a_policy_turned_off_is_deleted_and_a_stored_one_is_not_reapplied() -> None:
    from kubeforge.operator.manifests import network_policies

    wanted = [*_wanted(), *network_policies(BODY)]
    live = {(o["kind"], o["metadata"]["name"]): ch.fingerprint(_as_stored(o)) for o in wanted}
    assert ch.drifted(wanted, live) == []
    assert ch.unwanted(wanted, live, "NetworkPolicy") == []
    off = _wanted()
    assert ch.unwanted(off, live, "NetworkPolicy") == ["svc-replicas", "svc-router"]
    edited = dict(live)
    edited[("NetworkPolicy", "svc-replicas")] = ch.fingerprint(
        {**network_policies(BODY)[0], "spec": {"podSelector": {}, "ingress": [{}]}}
    )
    assert [o["metadata"]["name"] for o in ch.drifted(wanted, edited)] == ["svc-replicas"]
