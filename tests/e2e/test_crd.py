"""The Service CRD on a real API server: Established, validated, scalable, readable."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.crd import CRD_NAME

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
COUNTER = yaml.safe_load((REPO / "examples" / "counter.yaml").read_text())


@pytest.fixture(scope="module")
def crd(cluster: Any) -> str:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / f"{CRD_NAME}.yaml")
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return CRD_NAME


def test_crd_is_established_and_structural(cluster: Any, crd: str) -> None:
    conds = json.loads(cluster.kubectl("get", "crd", crd, "-o", "json").stdout)["status"][
        "conditions"
    ]
    by_type = {c["type"]: c["status"] for c in conds}
    assert by_type["Established"] == "True"
    assert by_type.get("NonStructuralSchema", "False") == "False"
    resources = cluster.kubectl("api-resources", "--api-group=kubeforge.dev").stdout
    assert "fsvc" in resources and "services" in resources


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(COUNTER)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last)
    else:
        node[last] = value
    return doc


_DELETE = object()

INVALID = [
    ("replicas -1", _with("spec.replicas", -1), "spec.replicas"),
    ("gpusPerReplica two", _with("spec.gpusPerReplica", "two"), "spec.gpusPerReplica"),
    ("healthPollRate fast", _with("spec.healthPollRate", "fast"), "spec.healthPollRate"),
    ("actor without colon", _with("spec.actor", "examples.counter"), "spec.actor"),
    ("unknown field", _with("spec.replicaz", 3), "replicaz"),
    ("no actor", _with("spec.actor", _DELETE), "spec.actor"),
    (
        "maxConcurrentRequests 0",
        _with("spec.maxConcurrentRequests", 0),
        "spec.maxConcurrentRequests",
    ),
    ("requestTimeout soon", _with("spec.requestTimeout", "soon"), "spec.requestTimeout"),
    (
        "healthPollRate 1ms",
        _with("spec.healthPollRate", "1ms"),
        "healthPollRate must be at least 10ms",
    ),
    (
        "timeout below poll rate",
        _with("spec.requestTimeout", "100ms")
        | {"spec": {**COUNTER["spec"], "requestTimeout": "100ms", "healthPollRate": "1s"}},
        "requestTimeout must not be shorter than healthPollRate",
    ),
    ("args not a list", _with("spec.args", 5), "spec.args"),
    ("kwargs a list", _with("spec.kwargs", [1]), "spec.kwargs"),
    ("router replicas 0", _with("spec.router", {"replicas": 0}), "spec.router.replicas"),
    ("name too long", _with("metadata.name", "c" * 51), "metadata.name must be at most 50"),
    ("name not a DNS label", _with("metadata.name", "1counter"), "DNS-1035"),
    # Empty strings where "" means nothing: refused, not silently replaced by a default.
    ("image empty", _with("spec.image", ""), "spec.image"),
    ("schedulerName empty", _with("spec.schedulerName", ""), "spec.schedulerName"),
    ("priorityClassName empty", _with("spec.priorityClassName", ""), "spec.priorityClassName"),
    ("runtimeClassName empty", _with("spec.runtimeClassName", ""), "spec.runtimeClassName"),
    ("drainGrace soon", _with("spec.drainGrace", "soon"), "spec.drainGrace"),
    ("drainGrace 2h", _with("spec.drainGrace", "2h"), "drainGrace must be at most 1h"),
    ("nodeLossGrace 2h", _with("spec.nodeLossGrace", "2h"), "nodeLossGrace must be at most 1h"),
    ("procs 0", _with("spec.procs", 0), "spec.procs"),
    (
        "autoscaling min above max",
        _with("spec.autoscaling", {"minReplicas": 4, "maxReplicas": 2, "targetInFlight": 2}),
        "minReplicas must not be above maxReplicas",
    ),
    (
        "autoscaling target 0",
        _with("spec.autoscaling", {"maxReplicas": 2, "targetInFlight": 0}),
        "spec.autoscaling.targetInFlight",
    ),
    (
        "autoscaling delay 2h",
        _with(
            "spec.autoscaling",
            {"maxReplicas": 2, "targetInFlight": 1, "scaleDownDelay": "2h"},
        ),
        "scaleUpDelay and scaleDownDelay must be at most 1h",
    ),
    (
        "autoscaling without max",
        _with("spec.autoscaling", {"targetInFlight": 1}),
        "spec.autoscaling.maxReplicas",
    ),
    ("hosts 0", _with("spec.hosts", 0), "spec.hosts"),
    (
        "GPUs not split evenly over ranks",
        {"spec": {**COUNTER["spec"], "procs": 2, "hosts": 2, "gpusPerReplica": 6}}
        | {k: v for k, v in COUNTER.items() if k != "spec"},
        "gpusPerReplica must be a multiple of procs x hosts",
    ),
    (
        "issuer of an unknown kind",
        _with("spec.tls", {"issuerRef": {"name": "ca", "kind": "Authority"}}),
        "spec.tls.issuerRef.kind",
    ),
    ("issuer without a name", _with("spec.tls", {"issuerRef": {}}), "spec.tls.issuerRef.name"),
]


@pytest.mark.parametrize(("case", "doc", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifests_are_rejected_naming_the_field(
    cluster: Any, crd: str, namespace: str, case: str, doc: dict[str, Any], field: str
) -> None:
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode != 0, f"{case} was accepted"
    assert field in out.stderr, out.stderr
    listed = cluster.kubectl("get", "fsvc", "-n", namespace, "-o", "name").stdout
    assert listed.strip() == ""  # nothing was created


def test_valid_manifest_defaults_scale_and_columns(cluster: Any, crd: str, namespace: str) -> None:
    doc = copy.deepcopy(COUNTER)
    doc["spec"].pop("healthPollRate", None)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    stored = json.loads(
        cluster.kubectl(
            "get", "services.kubeforge.dev", "counter", "-n", namespace, "-o", "json"
        ).stdout
    )
    assert stored["spec"]["healthPollRate"] == "200ms"  # server-side default, visible
    assert stored["spec"]["gpusPerReplica"] == 0
    assert "image" not in stored["spec"]  # no invisible null defaults written
    cluster.kubectl("scale", "-n", namespace, "services.kubeforge.dev/counter", "--replicas=5")
    assert (
        json.loads(cluster.kubectl("get", "fsvc", "counter", "-n", namespace, "-o", "json").stdout)[
            "spec"
        ]["replicas"]
        == 5
    )
    header = cluster.kubectl("get", "fsvc", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "DESIRED", "READY", "HEALTHY", "GPUS", "REQ/S", "SESSIONS", "AGE"]
    # Core v1 wins the plain name; the group-qualified name and the short name reach ours.
    core = cluster.kubectl("get", "services", "-n", namespace, "-o", "name").stdout
    assert "service/counter" not in core.split()  # (an operator may have made counter-router)


def test_the_tls_issuer_is_fixed_once_the_service_exists(
    cluster: Any, crd: str, namespace: str
) -> None:
    """Routers trust the CA they started with: another issuer's certificate would fail their
    check, so the API server refuses the change (and any other edit still goes through)."""
    apply = lambda doc: cluster.kubectl(  # noqa: E731
        "apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert apply(COUNTER).returncode == 0
    added = apply(_with("spec.tls", {"issuerRef": {"name": "ca"}}))
    assert added.returncode != 0 and "tls.issuerRef is fixed" in added.stderr, added.stderr
    cluster.kubectl("delete", "fsvc", "-n", namespace, COUNTER["metadata"]["name"])
    issued = _with("spec.tls", {"issuerRef": {"name": "ca"}})
    assert apply(issued).returncode == 0
    for changed in (
        {"issuerRef": {"name": "other"}},
        {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}},
        {"enabled": True},  # dropped
    ):
        out = apply(_with("spec.tls", changed))
        assert out.returncode != 0 and "tls.issuerRef is fixed" in out.stderr, (changed, out)
    scaled = _with("spec.tls", {"issuerRef": {"name": "ca"}, "enabled": True})
    scaled["spec"]["replicas"] = 3
    assert apply(scaled).returncode == 0
    spec = json.loads(
        cluster.kubectl(
            "get", "fsvc", "-n", namespace, COUNTER["metadata"]["name"], "-o", "json"
        ).stdout
    )["spec"]
    assert spec["replicas"] == 3
    assert spec["tls"]["issuerRef"] == {"name": "ca", "kind": "Issuer", "group": "cert-manager.io"}
