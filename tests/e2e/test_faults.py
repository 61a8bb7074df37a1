"""Faults of the control plane under load: the data path must not notice, and everything that
watches the API must pick up where it left off once the API is back."""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from typing import Any

import pytest

from kubeforge import ServiceClient
from kubeforge.operator.manifests import ROUTER_PORT
from tests.e2e.conftest import Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import _router_pods, _token, fsvc, replica_pods, service

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
