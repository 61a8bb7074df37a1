"""Faults of the control plane under load: the data path must not notice, and everything that
watches the API must pick up where it left off once the API is back."""

from __future__ import annotations

import asyncio
import calendar
import json
import threading
import time
from typing import Any, Self

import pytest

from kubeforge import ServiceClient
from kubeforge.contract import L_HASH as HASH
from kubeforge.operator.manifests import GPU, ROUTER_PORT
from tests.e2e.conftest import Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import (
    _router_pods,
    _token,
    fsvc,
    ready,
    replica_pods,
    replicas_only,
    service,
)

pytestmark = pytest.mark.timeout(300)


class Load:
    """Steady calls through the router: two callers without a session, one in a session."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client
        self.calls = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def _caller(self, session: bool) -> None:
        sid = await self.client.start_session() if session else None
        while not self._stop.is_set():
            try:
                await self.client.whoami(sid)
                self.calls += 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._caller(s)) for s in (False, False, True)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def replica_names(cluster: Any, ns: str, name: str) -> list[str]:
    return sorted(
        p["metadata"]["name"]
        for p in replica_pods(cluster, ns, name)
        if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"
    )


@pytest.mark.process_node  # restarts a component of the process-node control plane
@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
async def test_control_plane_restart_under_load(
    cluster: Any, namespace: str, operator: Operator, component: str
) -> None:
    """While the API is down, calls through the router keep succeeding. Once it is back, the
    router's watches and status writes resume, and the operator scales without duplicates."""
    name = "cp"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service(name, 3, gpus=0))
    wait_for(
        lambda: fsvc(cluster, namespace, name).get("status", {}).get("healthyReplicas") == 3, 90
    )
    router = wait_for(lambda: _router_pods(cluster, namespace, name), 60)[0]
    url = f"http://{router['status']['podIP']}:{ROUTER_PORT}"
    async with ServiceClient(url, token=_token(cluster, namespace, name)) as client:
        async with Load(client) as load:
            await asyncio.sleep(1)
            before = load.calls
            down = await asyncio.to_thread(cluster.control.restart, component, 3.0)
            during = load.calls - before
            back = time.time()
            assert not load.failures, load.failures[:3]
            assert during > 50, f"only {during} calls in {down:.1f} s of API downtime"

            def status_written() -> bool:
                """the router wrote status again after the API came back"""
                metrics = fsvc(cluster, namespace, name).get("status", {}).get("metrics") or {}
                stamp = metrics.get("lastUpdateTime")
                written = (
                    calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) if stamp else 0
                )
                return written >= int(back)

            wait_for(status_written, 60)
            patch = json.dumps({"spec": {"replicas": 4}})
            cluster.kubectl("patch", "fsvc", name, "-n", namespace, "--type=merge", "-p", patch)
            deadline = time.monotonic() + 90
            while [r["state"] for r in await client.replicas()] != ["HEALTHY"] * 4:
                assert time.monotonic() < deadline, "the router did not see the new replica"
                await asyncio.sleep(0.2)
        assert not load.failures, load.failures[:3]
    assert replica_names(cluster, namespace, name) == [f"{name}-replica-{i}" for i in range(4)]
    print(
        f"[fault] {component} down {down:.1f} s: {during} calls through the router meanwhile, "
        f"{load.calls} in all, 0 failed"
    )


async def test_router_pod_killed_under_load(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    """With two router pods, a client that knows both loses no call without a session when one
    is SIGKILLed; sessions keep their replicas (their ids carry them, whichever router reads
    them). A call in a session that was in flight on the dead router may fail, at most once."""
    name = "rk"
    spec = service(name, 3, gpus=0, router={"replicas": 2})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
    wait_for(lambda: len(_router_pods(cluster, namespace, name)) == 2, 90)
    wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("healthyReplicas") == 3)
    routers = _router_pods(cluster, namespace, name)
    urls = [f"http://{p['status']['podIP']}:{ROUTER_PORT}" for p in routers]
    async with ServiceClient(urls, token=_token(cluster, namespace, name)) as client:
        sids = [await client.start_session() for _ in range(4)]
        holder = {sid: (await client.whoami(sid))["replica"] for sid in sids}
        stop = asyncio.Event()
        calls, lost_free, lost_in_session = 0, [], []

        async def caller(sid: str | None) -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    await client.whoami(sid)
                    calls += 1
                except Exception as exc:
                    (lost_in_session if sid else lost_free).append(f"{type(exc).__name__}: {exc}")

        tasks = [asyncio.create_task(caller(s)) for s in [None, None, *sids]]
        await asyncio.sleep(1)
        victim = next(p for p in routers if urls[0].startswith(f"http://{p['status']['podIP']}:"))
        cluster.kill_container(namespace, victim["metadata"]["name"], "router")
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*tasks)
        assert lost_free == [], lost_free[:3]
        assert len(lost_in_session) <= len(sids), lost_in_session
        assert {sid: (await client.whoami(sid))["replica"] for sid in sids} == holder
    print(
        f"[fault] router pod killed: {calls} calls, 0 failed without a session, "
        f"{len(lost_in_session)} of {len(sids)} sessions saw their in-flight call fail"
    )


class Sampler:
    """Calls `sample()` every `period` seconds in a thread, for the length of a `with` block:
    invariants that must hold at every moment of a test, not only at its end."""

    period = 0.2

    def __init__(self, cluster: Any, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()
            self.samples += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class GpuWatch(Sampler):
    """The GPUs held by a Service's replica pods: every pod placed on a node and not finished
    holds its limit, terminating ones included."""

    peak = 0

    def held(self) -> int:
        return sum(
            int(p["spec"]["containers"][0]["resources"].get("limits", {}).get(GPU, 0))
            for p in replica_pods(self.cluster, self.namespace, self.name)
            if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"
            and p["spec"].get("nodeName")
            and p["status"].get("phase") not in ("Succeeded", "Failed")
        )

    def sample(self) -> None:
        self.peak = max(self.peak, self.held())


def replicas_now(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return replicas_only(replica_pods(cluster, ns, name))


def test_operator_killed_mid_rollout(cluster: Any, namespace: str, operator: Operator) -> None:
    """SIGKILLed while it replaces replicas one at a time: the restarted operator finishes the
    rollout, and the Service never holds more GPUs than replicas x gpusPerReplica."""
    name = "mr"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service(name, 3, gpus=1))
    wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("readyReplicas") == 3, 90)
    old = {p["metadata"]["labels"][HASH] for p in replicas_now(cluster, namespace, name)}
    with GpuWatch(cluster, namespace, name) as gpus:
        changed = service(name, 3, gpus=1, kwargs={"start": 7})
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=changed)
        wait_for(
            lambda: any(
                p["metadata"]["labels"][HASH] not in old
                for p in replicas_now(cluster, namespace, name)
            ),
            60,
        )  # the rollout has begun
        operator.kill9()
        operator.start()

        def rolled_out() -> bool:
            """three Ready replicas, all of the new template, indices 0..2"""
            pods = replicas_now(cluster, namespace, name)
            return (
                sorted(p["metadata"]["name"] for p in pods)
                == [f"{name}-replica-{i}" for i in range(3)]
                and all(ready(p) for p in pods)
                and not {p["metadata"]["labels"][HASH] for p in pods} & old
            )

        wait_for(rolled_out, 150)
    assert gpus.peak <= 3, f"{gpus.peak} GPUs held by a Service of 3 x 1"
    wait_for(lambda: fsvc(cluster, namespace, name)["status"].get("updatedReplicas") == 3, 30)
    print(f"[fault] operator killed mid-rollout: finished, peak {gpus.peak} GPUs of 3")


def test_operator_killed_mid_scale_down(cluster: Any, namespace: str, operator: Operator) -> None:
    name = "md"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service(name, 4, gpus=1))
    wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("readyReplicas") == 4, 90)
    with GpuWatch(cluster, namespace, name) as gpus:
        cluster.kubectl("scale", "-n", namespace, f"services.kubeforge.dev/{name}", "--replicas=1")
        wait_for(lambda: len(replicas_now(cluster, namespace, name)) < 4, 30)  # begun
        operator.kill9()
        operator.start()

        def scaled_down() -> bool:
            """only replica 0 is left, Ready, and no pod of the others holds a GPU"""
            pods = replicas_now(cluster, namespace, name)
            return [p["metadata"]["name"] for p in pods] == [f"{name}-replica-0"] and (
                ready(pods[0]) and gpus.held() == 1
            )

        wait_for(scaled_down, 120)
    assert gpus.peak <= 4
    wait_for(lambda: fsvc(cluster, namespace, name)["status"].get("readyReplicas") == 1, 30)
    print(f"[fault] operator killed mid-scale-down: 4 -> 1 finished, peak {gpus.peak} GPUs")


@pytest.mark.process_node  # a second process node, frozen as a lost machine
async def test_node_lost(cluster: Any, namespace: str, operator: Operator) -> None:
    """A node stops reporting and its processes stop answering. The router drops its replicas
    as soon as their health polls fail, and their sessions move; Kubernetes evicts the pods
    after nodeLossGrace, and the operator replaces them on the node that works."""
    name, lost = "nl", "e2e-node-2"
    node = cluster.add_node(lost, gpus=4, ip_prefix="127.0.1.")
    main = cluster.node.name
    try:
        # The router and replica 0 on the main node, replicas 1 and 2 on the one to be lost.
        cluster.kubectl("cordon", lost)
        spec = service(name, 1, gpus=1, nodeLossGrace="2s", drainGrace="1s", requestTimeout="5s")
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
        wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("readyReplicas") == 1)
        router = wait_for(lambda: _router_pods(cluster, namespace, name), 60)[0]
        cluster.kubectl("cordon", main)
        cluster.kubectl("uncordon", lost)
        cluster.kubectl("scale", "-n", namespace, f"services.kubeforge.dev/{name}", "--replicas=3")
        wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("readyReplicas") == 3)
        cluster.kubectl("uncordon", main)
        on_lost = {p["metadata"]["name"] for p in replicas_now(cluster, namespace, name)} - {
            f"{name}-replica-0"
        }
        assert all(
            p["spec"]["nodeName"] == lost
            for p in replicas_now(cluster, namespace, name)
            if p["metadata"]["name"] in on_lost
        )
        url = f"http://{router['status']['podIP']}:{ROUTER_PORT}"
        async with ServiceClient(url, token=_token(cluster, namespace, name)) as client:
            await _until_states(client, ["HEALTHY"] * 3, 30)
            sids = [await client.start_session() for _ in range(6)]
            holder = {sid: (await client.whoami(sid))["replica"] for sid in sids}
            moving = [sid for sid in sids if holder[sid] in on_lost]
            assert moving, holder
            await asyncio.to_thread(cluster.run, node.freeze())
            frozen = time.monotonic()
            await _until_states(client, ["HEALTHY", "UNHEALTHY", "UNHEALTHY"], 10, prefix=True)
            dropped = time.monotonic() - frozen
            for sid in moving:  # re-pinned to the replica that is left
                assert (await client.whoami(sid))["replica"] == f"{name}-replica-0"

            def replaced() -> bool:
                """three Ready replicas again, none on the lost node"""
                pods = replicas_now(cluster, namespace, name)
                return len(pods) == 3 and all(
                    ready(p) and p["spec"]["nodeName"] == main for p in pods
                )

            await asyncio.to_thread(wait_for, replaced, 150, 1.0)
            back = time.monotonic() - frozen
            await _until_states(client, ["HEALTHY"] * 3, 30)
            for sid in moving:  # sessions stay where they moved
                assert (await client.whoami(sid))["replica"] == f"{name}-replica-0"
    finally:
        cluster.kubectl("uncordon", main, check=False)
        cluster.kubectl("delete", "node", lost, "--wait=false", check=False)
    # The bound: the controller's node-monitor-grace-period (40 s here, 50 s by default), then
    # nodeLossGrace, then the pod's termination grace (drainGrace + 5 s), then a start.
    assert back <= 40 + 5 + 2 + 6 + 30, back
    print(
        f"[fault] node lost: router dropped its replicas after {dropped:.1f} s, "
        f"{len(moving)} sessions re-pinned, replicas replaced and Ready after {back:.1f} s"
    )


async def _until_states(
    client: ServiceClient, states: list[str], timeout: float, prefix: bool = False
) -> None:
    """The router's replica states, in index order, are `states` (for `prefix`, the first
    is and the rest are anything but HEALTHY)."""
    deadline = time.monotonic() + timeout
    while True:
        now = [r["state"] for r in await client.replicas()]
        if now == states or (
            prefix and now[:1] == states[:1] and "HEALTHY" not in now[1:] and len(now) == 3
        ):
            return
        assert time.monotonic() < deadline, f"replica states {now}, not {states}"
        await asyncio.sleep(0.1)
