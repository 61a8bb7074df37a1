"""The e2e cluster itself behaves like Kubernetes: scheduling, controllers, kubelet duties."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from devcluster.services import service_endpoints
from tests.e2e.conftest import ExternalCluster, wait_gpus_free

# The process node's own behaviour (pods as processes on loopback, images it never pulls); on
# kind the kubelet's is checked by test_real_node.py.
pytestmark = [pytest.mark.timeout(300), pytest.mark.process_node]


def apply(cluster: Any, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get(cluster: Any, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "-n", namespace, *what, "-o", "json").stdout)


def wait_for(check: Any, timeout: float = 60.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout:g}s: {check.__doc__ or check}")
        time.sleep(interval)


def pids_of(pod: dict[str, Any]) -> list[int]:
    return [
        int(s["containerID"].removeprefix("process://"))
        for s in pod["status"].get("containerStatuses", [])
        if s.get("containerID")
    ]


def alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


WEB = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [
                    {
                        "name": "web",
                        "image": "python:3.11-slim",
                        "command": ["python", "-m", "http.server", "8000", "--bind", "$(POD_IP)"],
                        "env": [
                            {
                                "name": "POD_IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            }
                        ],
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "readinessProbe": {
                            "httpGet": {"path": "/", "port": "http"},
                            "periodSeconds": 1,
                        },
                    }
                ]
            },
        },
    },
}


def test_deployment_pods_are_scheduled_run_and_end_with_it(cluster: Any, namespace: str) -> None:
    apply(cluster, namespace, WEB)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/web", "--timeout=90s"
    )
    pods = get(cluster, namespace, "pods", "-l", "app=web")["items"]
    assert len(pods) == 2
    assert {p["spec"]["nodeName"] for p in pods} != {None}  # placed by the real scheduler
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet" for p in pods)
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.0.0.") for ip in ips)
    if not isinstance(cluster, ExternalCluster):
        for ip in ips:
            with urllib.request.urlopen(f"http://{ip}:8000/", timeout=5) as resp:
                assert resp.status == 200
        pids = [pid for p in pods for pid in pids_of(p)]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    cluster.kubectl("delete", "-n", namespace, "deployment/web")

    def gone() -> bool:
        """both pods deleted"""
        return not get(cluster, namespace, "pods", "-l", "app=web")["items"]

    wait_for(gone, 60)
    if not isinstance(cluster, ExternalCluster):
        wait_for(lambda: not any(alive(p) for p in pids), 10)


def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", "import time; time.sleep(3600)"],
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def test_gpu_capacity_is_enforced_by_the_scheduler(cluster: Any, namespace: str) -> None:
    wait_gpus_free(cluster)  # an earlier module's GPU pods may still be terminating
    apply(cluster, namespace, gpu_pod("gpu-a", 3))
    waited = cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "pod/gpu-a", "--timeout=60s", check=False
    )
    if waited.returncode:  # say why: the pod's conditions, and who holds the node's GPUs
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        node = cluster.kubectl("describe", "nodes", check=False).stdout[-2500:]
        pod = get(cluster, namespace, "pod", "gpu-a")["status"]
        raise AssertionError(f"gpu-a not Ready: {waited.stderr}\n{pod}\n{pods}\n{node}")
    apply(cluster, namespace, gpu_pod("gpu-b", 3))

    def unschedulable() -> dict[str, Any] | None:
        """gpu-b reported Unschedulable"""
        conds = get(cluster, namespace, "pod", "gpu-b")["status"].get("conditions", [])
        return next(
            (
                c
                for c in conds
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            ),
            None,
        )

    cond = wait_for(unschedulable, 60)
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert get(cluster, namespace, "pod", "gpu-b")["status"]["phase"] == "Pending"


def test_deleting_an_owner_deletes_what_it_owns(cluster: Any, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owner"},
            "data": {"a": "1"},
        },
    )
    uid = get(cluster, namespace, "configmap", "owner")["metadata"]["uid"]
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "data": {"b": "2"},
            "metadata": {
                "name": "owned",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
                ],
            },
        },
    )
    cluster.kubectl("delete", "-n", namespace, "configmap", "owner")

    def collected() -> bool:
        """the owned ConfigMap was garbage-collected"""
        out = cluster.kubectl("get", "-n", namespace, "configmap", "owned", check=False)
        return out.returncode != 0 and "NotFound" in out.stderr

    wait_for(collected, 60)


def test_crashing_container_restarts_with_backoff(cluster: Any, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crasher"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11-slim",
                        "command": ["python", "-c", "import sys; sys.exit(1)"],
                    }
                ]
            },
        },
    )

    def restarted_twice() -> dict[str, Any] | None:
        """restartCount >= 2"""
        statuses = get(cluster, namespace, "pod", "crasher")["status"].get("containerStatuses", [])
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 2 else None

    started = time.monotonic()
    status = wait_for(restarted_twice, 90)
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert time.monotonic() - started >= 1.0  # back-off between restarts, not a hot loop


def test_server_side_dry_run_rejects_an_invalid_object(cluster: Any, namespace: str) -> None:
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bad"},
        "spec": {
            "replicas": -1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    out = cluster.kubectl(
        "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False
    )
    assert out.returncode != 0
    assert "spec.replicas: Invalid value: -1" in out.stderr


def test_rbac_is_enforced_for_in_pod_clients(cluster: Any, namespace: str) -> None:
    if isinstance(cluster, ExternalCluster):
        pytest.fail("this test runs kubectl inside a pod; on kind use an image that has it")
    kubectl = str(cluster.control.bins / "kubectl")
    for doc in (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "lister"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "list-pods"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "get"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "lister"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "list-pods",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}],
        },
    ):
        apply(cluster, namespace, doc)
    apply(cluster, namespace, gpu_pod("victim", 0))
    script = (
        f"{kubectl} get pods -o name | grep -q pod/victim && "
        f"{kubectl} delete pod victim 2>&1 | tee /dev/stderr | grep -q Forbidden"
    )
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client"},
            "spec": {
                "serviceAccountName": "lister",
                "restartPolicy": "Never",
                "containers": [
                    {"name": "main", "image": "bitnami/kubectl", "command": ["sh", "-c", script]}
                ],
            },
        },
    )

    def finished() -> str | None:
        """the client pod finished"""
        phase = get(cluster, namespace, "pod", "client")["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for(finished, 60) == "Succeeded"  # it listed pods and was refused the delete
    assert get(cluster, namespace, "pod", "victim")["metadata"]["name"] == "victim"


def test_pod_environment_from_fields_secrets_and_configmaps(cluster: Any, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "stringData": {"token": "s3cret"},
        },
    )
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "c"},
            "data": {"mode": "fast", "x": "1"},
        },
    )
    check = (
        "import os, sys; e = os.environ; "
        "ok = (e['TOKEN'] == 's3cret' and e['MODE'] == 'fast' and e['CFG_x'] == '1' "
        f"and e['NS'] == '{namespace}' and e['NAME'] == 'env' and e['LITERAL'] == 'plain' "
        "and e['IP'] == e['KUBEFORGE_BIND_HOST'] and e['IP'].startswith('127.0.0.') "
        "and e['APP'] == 'envtest'); print(dict(e)); sys.exit(0 if ok else 3)"
    )

    def ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "env", "labels": {"app": "envtest"}},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11-slim",
                        "command": ["python", "-c", check],
                        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CFG_"}],
                        "env": [
                            {"name": "LITERAL", "value": "plain"},
                            {
                                "name": "TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}},
                            },
                            {
                                "name": "MODE",
                                "valueFrom": {"configMapKeyRef": {"name": "c", "key": "mode"}},
                            },
                            {"name": "NS", "valueFrom": ref("metadata.namespace")},
                            {"name": "NAME", "valueFrom": ref("metadata.name")},
                            {"name": "IP", "valueFrom": ref("status.podIP")},
                            {"name": "APP", "valueFrom": ref("metadata.labels['app']")},
                        ],
                    }
                ],
            },
        },
    )

    def finished() -> str | None:
        """the env pod finished"""
        phase = get(cluster, namespace, "pod", "env")["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for(finished, 60) == "Succeeded"
    state = get(cluster, namespace, "pod", "env")["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 0


def test_failing_liveness_probe_restarts_the_container(cluster: Any, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "unlive"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11-slim",
                        "command": ["python", "-c", "import time; time.sleep(3600)"],
                        "livenessProbe": {
                            "httpGet": {"path": "/healthz", "port": 9},
                            "periodSeconds": 1,
                            "failureThreshold": 2,
                        },
                    }
                ]
            },
        },
    )

    def restarted() -> bool:
        """the container was restarted by its liveness probe"""
        statuses = get(cluster, namespace, "pod", "unlive")["status"].get("containerStatuses", [])
        return bool(statuses) and statuses[0]["restartCount"] >= 1

    wait_for(restarted, 60)


def test_services_resolve_to_their_ready_pods(cluster: Any, namespace: str) -> None:
    """No kube-proxy here, and the API server keeps loopback pod IPs out of EndpointSlices, so a
    Service resolves to its selector's ready pods at the target port, as the slices would."""
    apply(cluster, namespace, WEB)
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    )
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/web", "--timeout=90s"
    )
    addresses = service_endpoints(cluster.kubectl, namespace, "web")
    pods = get(cluster, namespace, "pods", "-l", "app=web")["items"]
    assert addresses == sorted(f"{p['status']['podIP']}:8000" for p in pods)
    if not isinstance(cluster, ExternalCluster):
        for address in addresses:
            with urllib.request.urlopen(f"http://{address}/", timeout=5) as resp:
                assert resp.status == 200
    # One pod stops being ready: it drops out, as it would from the EndpointSlice.
    cluster.kubectl("delete", "-n", namespace, "pod", pods[0]["metadata"]["name"], "--wait=true")
    assert pods[0]["status"]["podIP"] + ":8000" not in service_endpoints(
        cluster.kubectl, namespace, "web"
    )
