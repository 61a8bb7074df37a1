"""What only a real node answers: images, the container runtime, kube-proxy, cluster DNS and
EndpointSlices, Pod Security admission, the kubelet restarting a killed container.

These run in the kind lane (tests/e2e/kind/lane.sh), against the operator that the lane installed
with the chart into a namespace enforcing the `restricted` Pod Security Standard. Replica pods run
`kubeforge-examples`, an image built FROM kubeforge-replica with the examples baked in, as a user
builds theirs (images/examples.Dockerfile).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

import pytest

from kubeforge import ServiceClient
from kubeforge.operator.manifests import CONTAINER_SECURITY, POD_SECURITY, ROUTER_PORT
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import _token, fsvc, ready, replica_pods, service

pytestmark = [pytest.mark.timeout(300), pytest.mark.real_node]
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@pytest.fixture(scope="module")
def operator_namespace(cluster: Any) -> str:
    """The namespace of the lane's chart-installed operator, which enforces `restricted`."""
    ns = os.environ.get("KUBEFORGE_E2E_OPERATOR")
    if not ns:
        pytest.fail("real-node tests run in the kind lane (make e2e-kind): it installs the chart")
    labels = json.loads(cluster.kubectl("get", "namespace", ns, "-o", "json").stdout)["metadata"]
    assert labels["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    return ns


@pytest.fixture
def restricted(cluster: Any, namespace: str, operator_namespace: str) -> str:
    cluster.kubectl("label", "namespace", namespace, RESTRICTED, "--overwrite")
    return namespace


def deploy(cluster: Any, ns: str, name: str, replicas: int, gpus: int = 0) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=service(name, replicas, gpus=gpus))

    def up() -> bool:
        """every replica is Ready and the router Deployment is Available"""
        status = fsvc(cluster, ns, name).get("status", {})
        return status.get("readyReplicas") == replicas and status.get("healthyReplicas") == replicas

    wait_for(up, 150)
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Available", f"deployment/{name}-router", "--timeout=90s"
    )


def pods(cluster: Any, ns: str, name: str, component: str) -> list[dict[str, Any]]:
    return [
        p
        for p in replica_pods(cluster, ns, name)
        if p["metadata"]["labels"]["kubeforge.dev/component"] == component
        and not p["metadata"].get("deletionTimestamp")
    ]


def in_pod(cluster: Any, ns: str, pod: str, code: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("exec", "-n", ns, pod, "--", "python", "-c", code, check=False)


def test_kubeforge_pods_are_admitted_under_restricted_and_run_as_built(
    cluster: Any, restricted: str, operator_namespace: str
) -> None:
    """Operator, router and replicas pass `restricted` admission; they run as uid 1000; the
    operator and router cannot write their root file systems; GPUs come from node capacity."""
    deploy(cluster, restricted, "ro", 2, gpus=1)
    operator = json.loads(
        cluster.kubectl("get", "pods", "-n", operator_namespace, "-o", "json").stdout
    )["items"]
    assert [p["status"]["phase"] for p in operator] == ["Running"]
    checked = [
        (operator_namespace, operator[0]["metadata"]["name"], True),
        (restricted, pods(cluster, restricted, "ro", "router")[0]["metadata"]["name"], True),
        (restricted, pods(cluster, restricted, "ro", "replica")[0]["metadata"]["name"], False),
    ]
    for ns, pod, read_only in checked:
        uid = in_pod(cluster, ns, pod, "import os; print(os.getuid())")
        assert uid.stdout.strip() == "1000", (pod, uid.stderr)
        write = in_pod(cluster, ns, pod, "open('/kubeforge-probe', 'w')")
        if read_only:
            assert write.returncode != 0 and "Read-only file system" in write.stderr, (pod, write)
    replicas = pods(cluster, restricted, "ro", "replica")
    limits = [p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in replicas]
    assert limits == ["1", "1"]
    events = cluster.kubectl("get", "events", "-n", restricted, "-o", "json").stdout
    assert "violates PodSecurity" not in events


CLIENT = """
import asyncio, json, os, socket
from kubeforge import ServiceClient

async def main():
    url = os.environ["URL"]
    host = url.split("//")[1].split(":")[0]
    async with ServiceClient(url) as client:
        sid = await client.start_session()
        counts = [await client.incr(sid, 1) for _ in range(5)]
        names = [r["replica"] for r in await client.call_all("whoami")]
        spread = sorted({(await client.whoami(None))["replica"] for _ in range(8)})
        await client.terminate_session(sid)
    print(json.dumps({"address": socket.gethostbyname(host), "counts": counts,
                      "names": names, "spread": spread}))

asyncio.run(main())
"""


def test_torchforge_scenario_through_the_cluster_ip_from_a_client_pod(
    cluster: Any, restricted: str
) -> None:
    """A client pod finds the router by its DNS name; kube-proxy carries the calls to it."""
    deploy(cluster, restricted, "tf", 2)
    url = f"http://tf-router.{restricted}.svc.cluster.local:{ROUTER_PORT}"
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": POD_SECURITY,
            "containers": [
                {
                    "name": "client",
                    "image": os.environ["KUBEFORGE_E2E_REPLICA_IMAGE"],
                    "command": ["python", "-c", CLIENT],
                    "env": [
                        {"name": "URL", "value": url},
                        {
                            "name": "KUBEFORGE_TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "tf-token", "key": "token"}},
                        },
                    ],
                    "securityContext": CONTAINER_SECURITY,
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", restricted, "-f", "-", input=json.dumps(client))

    def finished() -> str | None:
        """the client pod ran to completion"""
        got = cluster.kubectl("get", "pod", "client", "-n", restricted, "-o", "json").stdout
        phase = json.loads(got)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, 90)
    log = cluster.kubectl("logs", "client", "-n", restricted).stdout
    if phase != "Succeeded":
        dns = cluster.kubectl("get", "pods", "-n", "kube-system", "-o", "wide").stdout
        dns += cluster.kubectl("logs", "-n", "kube-system", "-l", "k8s-app=kube-dns").stdout
        raise AssertionError(f"{log}\n--- kube-system ---\n{dns}")
    result = json.loads(log.strip().splitlines()[-1])
    cluster_ip = json.loads(
        cluster.kubectl("get", "service", "tf-router", "-n", restricted, "-o", "json").stdout
    )["spec"]["clusterIP"]
    assert result["address"] == cluster_ip
    assert result["counts"] == list(range(result["counts"][0], result["counts"][0] + 5))
    assert result["names"] == ["tf-replica-0", "tf-replica-1"]
    assert result["spread"] == ["tf-replica-0", "tf-replica-1"]


async def test_endpoint_slices_and_the_router_follow_ready_pods(
    cluster: Any, restricted: str
) -> None:
    """The router Service's EndpointSlice (kube-controller-manager's) lists the ready router
    pods; the router itself routes to exactly the ready replica pods' addresses."""
    deploy(cluster, restricted, "es", 2)
    routers = pods(cluster, restricted, "es", "router")

    def slice_addresses() -> list[str]:
        slices = json.loads(
            cluster.kubectl(
                "get", "endpointslices", "-n", restricted,
                "-l", "kubernetes.io/service-name=es-router", "-o", "json",
            ).stdout
        )["items"]  # fmt: skip
        return sorted(
            a
            for s in slices
            for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")
            for a in e["addresses"]
        )

    expected = sorted(p["status"]["podIP"] for p in routers if ready(p))
    assert wait_for(lambda: slice_addresses() == expected and expected, 30)
    replica_ips = sorted(p["status"]["podIP"] for p in pods(cluster, restricted, "es", "replica"))
    url = f"http://{routers[0]['status']['podIP']}:{ROUTER_PORT}"
    async with ServiceClient(url, token=_token(cluster, restricted, "es")) as client:
        rows = await client.replicas()
    assert sorted(r["url"].split("//")[1].split(":")[0] for r in rows) == replica_ips
    assert [r["state"] for r in rows] == ["HEALTHY", "HEALTHY"]


async def test_killed_replica_container_is_restarted_and_its_sessions_re_pinned(
    cluster: Any, restricted: str
) -> None:
    deploy(cluster, restricted, "kr", 2)
    router = pods(cluster, restricted, "kr", "router")[0]
    url = f"http://{router['status']['podIP']}:{ROUTER_PORT}"
    async with ServiceClient(url, token=_token(cluster, restricted, "kr")) as client:
        sid = await client.start_session()
        holder = (await client.whoami(sid))["replica"]
        cluster.kill_container(restricted, holder, "replica")
        killed = time.monotonic()
        # The session moves to the other replica; a call in flight at the kill may fail (at
        # most once), so retry until the router has noticed.
        while True:
            try:
                moved = (await client.whoami(sid))["replica"]
                break
            except Exception:
                assert time.monotonic() - killed < 15, "the session was not re-pinned"
                await asyncio.sleep(0.1)
        assert moved != holder
        re_pinned = time.monotonic() - killed

        def restarted() -> bool:
            """the kubelet restarted the killed container and the pod is Ready again"""
            pod = json.loads(
                cluster.kubectl("get", "pod", holder, "-n", restricted, "-o", "json").stdout
            )
            statuses = pod["status"].get("containerStatuses") or [{}]
            return statuses[0].get("restartCount", 0) >= 1 and ready(pod)

        wait_for(restarted, 90)
        deadline = time.monotonic() + 30
        while [r["state"] for r in await client.replicas()] != ["HEALTHY", "HEALTHY"]:
            assert time.monotonic() < deadline, "the restarted replica did not rejoin"
            await asyncio.sleep(0.2)
        # The session stays where it was re-pinned; calls without one reach both again.
        assert {(await client.whoami(sid))["replica"] for _ in range(5)} == {moved}
        assert {(await client.whoami(None))["replica"] for _ in range(8)} == {holder, moved}
    print(f"[real-node] session re-pinned {re_pinned:.2f} s after the kill")
