"""The operator on the real control plane, with replica pods really running as processes."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kubeforge import KubeforgeError, ServiceClient
from kubeforge.settings import router_request_timeout
from tests.e2e.conftest import Operator
from tests.e2e.test_cluster import wait_for
from tests.integration.test_service import torchforge_scenario

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def service(name: str, replicas: int, gpus: int = 1, **spec: Any) -> str:
    """A Service of the examples' Counter; on kind, from the image that has the examples."""
    image = os.environ.get("KUBEFORGE_E2E_REPLICA_IMAGE")
    if image:
        spec.setdefault("image", image)
    return json.dumps(
        {
            "apiVersion": "kubeforge.dev/v1alpha1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "gpusPerReplica": gpus,
                "actor": "examples.counter:Counter",
                **spec,
            },
        }
    )


def deploy(cluster: Any, ns: str, name: str, replicas: int, **kw: Any) -> None:
    """Apply a Service and wait until all its replicas are Ready."""
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=service(name, replicas, **kw))
    wait_for(lambda: fsvc(cluster, ns, name).get("status", {}).get("readyReplicas") == replicas, 90)


def fsvc(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "fsvc", name, "-n", ns, "-o", "json").stdout)


def replica_pods(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return json.loads(
        cluster.kubectl(
            "get", "pods", "-n", ns, "-l", f"kubeforge.dev/service={name}", "-o", "json"
        ).stdout
    )["items"]


def ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_apply_scale_replace_and_delete(cluster: Any, namespace: str, operator: Operator) -> None:
    started = time.monotonic()
    deploy(cluster, namespace, "counter", 3)
    print(f"apply -> 3 replicas Ready: {time.monotonic() - started:.1f}s")
    body = fsvc(cluster, namespace, "counter")
    assert condition(body, "Ready")["status"] == "True"
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    pods = replica_pods(cluster, namespace, "counter")
    replicas = [p for p in pods if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"]
    assert sorted(p["metadata"]["name"] for p in replicas) == [
        f"counter-replica-{i}" for i in range(3)
    ]
    assert all(
        ready(p) and p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
        for p in replicas
    )

    def row() -> list[str]:
        return cluster.kubectl("get", "fsvc", "-n", namespace).stdout.splitlines()[1].split()

    # NAME DESIRED READY HEALTHY GPUS: HEALTHY comes from the router's health polls.
    wait_for(lambda: row()[:5] == ["counter", "3", "3", "3", "1"], 30)

    # Scale past the node's 4 GPUs: 4 Ready, 1 Pending, Degraded with the scheduler's words.
    cluster.kubectl("scale", "-n", namespace, "services.kubeforge.dev/counter", "--replicas=5")

    def degraded() -> dict[str, Any] | None:
        """Degraded=True with the scheduler's message"""
        c = condition(fsvc(cluster, namespace, "counter"), "Degraded")
        return c if c.get("status") == "True" else None

    cond = wait_for(degraded, 60)
    assert cond["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in cond["message"]
    wait_for(lambda: fsvc(cluster, namespace, "counter")["status"]["readyReplicas"] == 4, 60)
    states = {
        p["metadata"]["name"]: p["status"]["phase"]
        for p in replicas_only(replica_pods(cluster, namespace, "counter"))
    }
    assert sorted(states.values()) == ["Pending", "Running", "Running", "Running", "Running"]

    # Scale to 2: the pending one and the highest indices go; no stray pod is left.
    cluster.kubectl("scale", "-n", namespace, "services.kubeforge.dev/counter", "--replicas=2")

    def two_left() -> bool:
        """only counter-replica-0 and -1 remain"""
        names = sorted(
            p["metadata"]["name"]
            for p in replicas_only(replica_pods(cluster, namespace, "counter"))
        )
        return names == ["counter-replica-0", "counter-replica-1"]

    wait_for(two_left, 60)
    wait_for(
        lambda: condition(fsvc(cluster, namespace, "counter"), "Degraded").get("status") == "False",
        30,
    )

    # A deleted replica pod comes back under its index.
    victim = next(
        p
        for p in replica_pods(cluster, namespace, "counter")
        if p["metadata"]["name"] == "counter-replica-1"
    )
    cluster.kubectl("delete", "pod", "-n", namespace, "counter-replica-1")

    def recreated() -> bool:
        """counter-replica-1 recreated (new uid) and Ready"""
        pods = {p["metadata"]["name"]: p for p in replica_pods(cluster, namespace, "counter")}
        new = pods.get("counter-replica-1")
        return bool(new) and new["metadata"]["uid"] != victim["metadata"]["uid"] and ready(new)

    wait_for(recreated, 60)

    # Deleting the Service removes its pods, router and Service.
    cluster.kubectl("delete", "fsvc", "-n", namespace, "counter")

    def all_gone() -> bool:
        """pods, router Deployment and Service garbage-collected"""
        left = cluster.kubectl(
            "get",
            "pods,deployments,services",
            "-n",
            namespace,
            "-l",
            "kubeforge.dev/service=counter",
            "-o",
            "name",
        ).stdout
        return left.strip() == ""

    wait_for(all_gone, 90)


def replicas_only(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if p["metadata"]["labels"].get("kubeforge.dev/component") == "replica"
        and not p["metadata"].get("deletionTimestamp")
    ]


def test_drifted_or_deleted_children_are_restored_at_once(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    """The operator watches its children: a deleted RoleBinding, an edited Role and a hand-
    scaled router Deployment are put back within seconds, without any timer."""
    deploy(cluster, namespace, "kids", 1, gpus=0)
    name = "kids-router"
    role = json.loads(cluster.kubectl("get", "role", name, "-n", namespace, "-o", "json").stdout)
    cluster.kubectl("delete", "rolebinding", name, "-n", namespace)
    cluster.kubectl(
        "patch", "role", name, "-n", namespace, "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/rules/0"}]),
    )  # fmt: skip
    cluster.kubectl("scale", "deployment", name, "-n", namespace, "--replicas=3")
    started = time.monotonic()

    def restored() -> bool:
        """RoleBinding back, Role rules and router replicas as the operator wants them"""
        binding = cluster.kubectl("get", "rolebinding", name, "-n", namespace, check=False)
        live = json.loads(
            cluster.kubectl("get", "role", name, "-n", namespace, "-o", "json").stdout
        )
        deployment = json.loads(
            cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout
        )
        return (
            binding.returncode == 0
            and live["rules"] == role["rules"]
            and deployment["spec"]["replicas"] == 1
        )

    wait_for(restored, 10, interval=0.1)
    print(f"children restored after {time.monotonic() - started:.2f}s")
    # The router's Role reaches its own Service only (the API server's answer, not ours).
    router = f"--as=system:serviceaccount:{namespace}:{name}"

    def may(verb: str, what: str, *sub: str) -> bool:
        argv = ["auth", "can-i", verb, what, "-n", namespace, router, *sub]
        return cluster.kubectl(*argv, check=False).stdout.strip() == "yes"

    assert may("watch", "services.kubeforge.dev/kids")
    assert may("patch", "services.kubeforge.dev/kids", "--subresource=status")
    assert not may("watch", "services.kubeforge.dev/other")
    assert not may("patch", "services.kubeforge.dev/other", "--subresource=status")
    assert not may("patch", "services.kubeforge.dev/kids")  # its spec is not the router's
    assert not may("get", "secrets")


def test_changed_args_roll_out_one_replica_at_a_time(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    deploy(cluster, namespace, "roll", 3, gpus=1)
    old = {
        p["metadata"]["labels"]["kubeforge.dev/template-hash"]
        for p in replicas_only(replica_pods(cluster, namespace, "roll"))
    }
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=service("roll", 3, gpus=1, kwargs={"start": 100})
    )
    lowest = 3
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pods = replicas_only(replica_pods(cluster, namespace, "roll"))
        lowest = min(lowest, sum(ready(p) for p in pods))
        hashes = {p["metadata"]["labels"]["kubeforge.dev/template-hash"] for p in pods}
        if len(pods) == 3 and all(ready(p) for p in pods) and not hashes & old:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the rollout did not finish")
    assert lowest >= 2, f"only {lowest} replicas were Ready at one point"
    wait_for(lambda: fsvc(cluster, namespace, "roll")["status"]["updatedReplicas"] == 3, 30)


def test_operator_killed_mid_scale_up_converges_without_duplicates(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    deploy(cluster, namespace, "crash", 1, gpus=0)
    cluster.kubectl("scale", "-n", namespace, "services.kubeforge.dev/crash", "--replicas=6")
    time.sleep(0.3)
    operator.kill9()
    operator.start()
    wait_for(lambda: fsvc(cluster, namespace, "crash")["status"].get("readyReplicas") == 6, 90)
    names = [
        p["metadata"]["name"] for p in replicas_only(replica_pods(cluster, namespace, "crash"))
    ]
    assert sorted(names) == [f"crash-replica-{i}" for i in range(6)]


async def test_service_client_through_the_router_on_kubernetes(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service("tf", 3, gpus=0))
    wait_for(lambda: fsvc(cluster, namespace, "tf").get("status", {}).get("readyReplicas") == 3, 90)
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Available",
        "deployment/tf-router",
        "--timeout=90s",
    )
    wait_for(lambda: len(_router_pods(cluster, namespace, "tf")) == 1, 90)
    router = _router_pods(cluster, namespace, "tf")[0]
    url = f"http://{router['status']['podIP']}:8080"
    secret = json.loads(
        cluster.kubectl("get", "secret", "tf-token", "-n", namespace, "-o", "json").stdout
    )
    token = base64.b64decode(secret["data"]["token"]).decode()
    async with ServiceClient(url, token=token) as client:

        async def all_healthy() -> bool:
            return [r["state"] for r in await client.replicas()] == ["HEALTHY"] * 3

        deadline = time.monotonic() + 30
        while not await all_healthy():
            assert time.monotonic() < deadline, cluster.pod_log(
                namespace, router["metadata"]["name"]
            )
            await asyncio.sleep(0.2)
        await torchforge_scenario(client, tuple(f"tf-replica-{i}" for i in range(3)))
        held = await client.start_session()
        for _ in range(20):
            await client.incr(held, 1)

    def live_metrics() -> dict[str, Any] | None:
        """the router wrote req/s and sessions into the resource's status"""
        metrics = fsvc(cluster, namespace, "tf").get("status", {}).get("metrics") or {}
        ok = metrics.get("requestRate", 0) > 0 and metrics.get("activeSessions", 0) >= 1
        return metrics if ok else None

    try:
        metrics = wait_for(live_metrics, 30)
    except AssertionError as exc:
        log = cluster.pod_log(namespace, router["metadata"]["name"])[-3000:]
        raise AssertionError(f"{exc}\n--- router log ---\n{log}") from None
    written = datetime.datetime.strptime(metrics["lastUpdateTime"], "%Y-%m-%dT%H:%M:%SZ")
    age = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - written
    assert age.total_seconds() < 30
    assert [r["name"] for r in metrics["replicas"]] == [f"tf-replica-{i}" for i in range(3)]
    row = cluster.kubectl("get", "fsvc", "tf", "-n", namespace).stdout.splitlines()[1].split()
    assert float(row[5]) > 0 and int(row[6]) >= 1  # REQ/S and SESSIONS columns
    assert fsvc(cluster, namespace, "tf")["status"]["healthyReplicas"] == 3
    # The router pod relays calls in Rust (relay/, built into the package).
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.get(url + "/v1/metrics") as resp,
    ):
        relay = (await resp.json())["relay"]
    assert relay["kind"] == "native" and relay["relayed"] > 20, relay
    # Without the token the router refuses the call.
    async with ServiceClient(url, token="wrong") as stranger:
        with pytest.raises(KubeforgeError, match="wrong token"):
            await stranger.whoami(None)
    await _router_follows_request_timeout(cluster, namespace, url, token)


async def _router_follows_request_timeout(
    cluster: Any, namespace: str, url: str, token: str
) -> None:
    """The router starts with the spec's requestTimeout (plus slack) and follows a change of it
    while running, natively relayed calls included."""

    async def settings() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
            http.get(url + "/v1/metrics") as resp,
        ):
            return (await resp.json())["settings"]

    assert (await settings())["request_timeout"] == router_request_timeout(60.0)
    patch = json.dumps({"spec": {"requestTimeout": "7m"}})
    cluster.kubectl("patch", "fsvc", "tf", "-n", namespace, "--type=merge", "-p", patch)

    async def followed() -> bool:
        # The changed flags also roll the Deployment: this pod is replaced once the new one is
        # Ready, so an answer may fail meanwhile; it must have followed before that.
        try:
            return (await settings())["request_timeout"] == router_request_timeout(420.0)
        except aiohttp.ClientError:
            return False

    await _until(followed, 10, "the running router did not follow requestTimeout: 7m")
    deployment = json.loads(
        cluster.kubectl("get", "deployment", "tf-router", "-n", namespace, "-o", "json").stdout
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--request-timeout") + 1] == "425s"


def _router_pods(cluster: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    return [
        p
        for p in replica_pods(cluster, namespace, name)
        if p["metadata"]["labels"]["kubeforge.dev/component"] == "router"
        and not p["metadata"].get("deletionTimestamp")
        and ready(p)
    ]


def router_url(cluster: Any, namespace: str, name: str) -> str:
    """The URL of the Service's router pod, once it is Ready."""
    wait_for(lambda: len(_router_pods(cluster, namespace, name)) == 1, 90)
    return f"http://{_router_pods(cluster, namespace, name)[0]['status']['podIP']}:8080"


def _token(cluster: Any, namespace: str, name: str) -> str:
    secret = json.loads(
        cluster.kubectl("get", "secret", f"{name}-token", "-n", namespace, "-o", "json").stdout
    )
    return base64.b64decode(secret["data"]["token"]).decode()


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_kill9_replica_process_behind_the_kubernetes_router(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service("k9", 3, gpus=0))
    wait_for(lambda: fsvc(cluster, namespace, "k9").get("status", {}).get("readyReplicas") == 3, 90)
    wait_for(lambda: len(_router_pods(cluster, namespace, "k9")) == 1, 90)
    url = f"http://{_router_pods(cluster, namespace, 'k9')[0]['status']['podIP']}:8080"
    async with ServiceClient(url, token=_token(cluster, namespace, "k9")) as client:

        async def states() -> list[str]:
            return [r["state"] for r in await client.replicas()]

        await _until(lambda: _eq(states(), ["HEALTHY"] * 3), 30, "3 healthy replicas")
        sids = [await client.start_session() for _ in range(6)]
        holder = {s: (await client.whoami(s))["replica"] for s in sids}
        victim = next(
            p
            for p in replica_pods(cluster, namespace, "k9")
            if p["metadata"]["name"] == "k9-replica-1"
        )
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await client.whoami(None)
                except KubeforgeError as exc:
                    errors.append(exc)

        workers = [asyncio.create_task(load()) for _ in range(2)]
        await asyncio.sleep(0.3)
        # From the moment of the kill (docker exec and crictl take a while before it, on kind).
        killed = await asyncio.to_thread(
            cluster.kill_container, namespace, victim["metadata"]["name"], "replica"
        )

        async def out_of_rotation() -> bool:
            return not any(
                r["name"] == "k9-replica-1" and r["state"] == "HEALTHY"
                for r in await client.replicas()
            )

        await _until(out_of_rotation, 5, "left rotation")
        left_after = time.time() - killed
        # The process node restarts the container; the router takes it back.
        await _until(lambda: _eq(states(), ["HEALTHY"] * 3), 60, "rejoined")
        stop.set()
        await asyncio.gather(*workers)
        assert left_after <= 0.2 + 1.0, left_after
        # Calls without a session see no error: one cut short on the killed replica is sent
        # again to a survivor (DESIGN §3).
        assert errors == []
        for sid in sids:
            reply = await client.whoami(sid)
            if holder[sid] == "k9-replica-1":
                assert sid in client._moved  # re-pinned, followed transparently
            else:
                assert reply["replica"] == holder[sid]


async def _eq(coro: Any, expected: Any) -> bool:
    return await coro == expected


async def test_two_router_pods_agree_on_sessions(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    # One router first; raising spec.router.replicas re-applies the router Deployment.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service("duo", 3, gpus=0))
    wait_for(lambda: len(_router_pods(cluster, namespace, "duo")) == 1, 90)
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=service("duo", 3, gpus=0, router={"replicas": 2})
    )
    wait_for(lambda: len(_router_pods(cluster, namespace, "duo")) == 2, 90)
    wait_for(
        lambda: fsvc(cluster, namespace, "duo").get("status", {}).get("healthyReplicas") == 3, 60
    )
    token = _token(cluster, namespace, "duo")
    first, second = (
        f"http://{p['status']['podIP']}:8080" for p in _router_pods(cluster, namespace, "duo")
    )
    async with ServiceClient(first, token=token) as a, ServiceClient(second, token=token) as b:
        sid = await a.start_session()
        home = (await a.whoami(sid))["replica"]
        assert {(await b.whoami(sid))["replica"] for _ in range(5)} == {home}
        for _ in range(20):
            await a.whoami(None)
            await b.whoami(None)

    def both_shares() -> dict[str, Any] | None:
        """each router pod publishes its share; the totals combine both"""
        status = fsvc(cluster, namespace, "duo").get("status", {})
        shares = status.get("routers") or {}
        rates = [s.get("requestRate", 0) for s in shares.values()]
        total = (status.get("metrics") or {}).get("requestRate", 0)
        ok = len(rates) == 2 and min(rates) > 0 and abs(total - sum(rates)) < 0.02
        return status if ok else None

    status = wait_for(both_shares, 30)
    assert set(status["routers"]) == {
        p["metadata"]["name"] for p in _router_pods(cluster, namespace, "duo")
    }
    # Replace one router pod: the new one routes the old session the same way.
    gone = _router_pods(cluster, namespace, "duo")[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", "-n", namespace, gone)
    wait_for(
        lambda: (
            len(_router_pods(cluster, namespace, "duo")) == 2
            and gone not in [p["metadata"]["name"] for p in _router_pods(cluster, namespace, "duo")]
        ),
        90,
    )
    for pod in _router_pods(cluster, namespace, "duo"):
        async with ServiceClient(f"http://{pod['status']['podIP']}:8080", token=token) as c:
            await _until(lambda c=c: _eq(_states(c), ["HEALTHY"] * 3), 30, "router ready")
            assert (await c.whoami(sid))["replica"] == home
    # The deleted router's share leaves the status; the new pod publishes its own.
    now = {p["metadata"]["name"] for p in _router_pods(cluster, namespace, "duo")}
    wait_for(lambda: set(fsvc(cluster, namespace, "duo")["status"].get("routers") or {}) == now, 30)


async def _states(client: ServiceClient) -> list[str]:
    return [r["state"] for r in await client.replicas()]
