"""Autoscaling on the real control plane: the count follows the load the routers publish, with
its windows, no failed call, sessions moved, and a full cluster held at one pending pod."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

import pytest

from kubeforge import KubeforgeError, ServiceClient
from tests.e2e.conftest import Operator
from tests.e2e.test_operator import (
    _token,
    condition,
    deploy,
    fsvc,
    replica_pods,
    router_url,
)
from tests.integration.test_cli import KUBEFORGE

pytestmark = pytest.mark.timeout(300)
SLOW = {"actor": "examples.slow:Slow", "kwargs": {"delay": 0.2}, "healthPollRate": "200ms"}


def replicas_of(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return [
        p
        for p in replica_pods(cluster, ns, name)
        if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"
    ]


def events(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    ).stdout
    return json.loads(out)["items"]


class Load:
    """`callers` tasks calling without a session until stopped; every failure is kept."""

    def __init__(self, client: ServiceClient, callers: int, pause: float = 0.0) -> None:
        self.errors: list[BaseException] = []
        self.calls = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(client, pause)) for _ in range(callers)]

    async def _run(self, client: ServiceClient, pause: float) -> None:
        while not self._stop.is_set():
            try:
                await client.work(None)
                self.calls += 1
            except KubeforgeError as exc:
                self.errors.append(exc)
            if pause:
                await asyncio.sleep(pause)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _until(check: Any, timeout: float, what: str, show: Any = None) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: {show() if show else ''}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_the_count_follows_the_load_without_a_failed_call(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    up_delay, down_delay = 5, 15
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetInFlight": 2,
        "scaleUpDelay": f"{up_delay}s",
        "scaleDownDelay": f"{down_delay}s",
    }
    deploy(cluster, namespace, "auto", 1, gpus=0, autoscaling=autoscaling, **SLOW)
    url = router_url(cluster, namespace, "auto")

    def count(field: str) -> int:
        body = fsvc(cluster, namespace, "auto")
        return (body["spec"] if field == "replicas" else body.get("status", {})).get(field, 0)

    async with ServiceClient(url, token=_token(cluster, namespace, "auto")) as client:
        heavy = Load(client, 8)
        scaled_up = await _until(
            lambda: count("replicas") == 3 and count("readyReplicas") == 3,
            up_delay + 10,
            "did not reach 3 replicas within scaleUpDelay + 10 s",
            lambda: (
                heavy.calls,
                heavy.errors[:2],
                fsvc(cluster, namespace, "auto").get("status"),
                [e["message"] for e in events(cluster, namespace, "auto")],
            ),
        )
        await heavy.stop()
        stopped = time.monotonic()
        # Without load, sessions spread over the 3 replicas (ties go to the fewest sessions);
        # the scale-down will take two of them away. The router must first see the load gone:
        # replicas report theirs on its health polls, a moment after the last call ends.
        # It places sessions on the replicas it knows as healthy, and learns of a new one from
        # its own pod watch, which may come after the operator counted the pod Ready.
        deadline = time.monotonic() + 30

        def settled(replicas: list[dict[str, Any]]) -> bool:
            idle = not any(r["in_flight"] or r["queue_depth"] for r in replicas)
            return idle and [r["state"] for r in replicas] == ["HEALTHY"] * 3

        while not settled(await client.replicas()):
            assert time.monotonic() < deadline, await client.replicas()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # two more polls: the replicas' own reports say idle too
        sids = [await client.start_session() for _ in range(6)]
        holders = {sid: (await client.whoami(sid))["replica"] for sid in sids}
        assert len(set(holders.values())) == 3, holders
        light = Load(client, 1, pause=0.5)  # calls without a session, through the scale-down
        await _until(
            lambda: (
                count("replicas") == 1
                and count("replicas") == count("readyReplicas")
                and len([p for p in replicas_of(cluster, namespace, "auto")]) == 1
            ),
            down_delay + 10 - (time.monotonic() - stopped),  # counted from the load's end
            "did not return to 1 replica within scaleDownDelay + 10 s",
            lambda: fsvc(cluster, namespace, "auto").get("status"),
        )
        scaled_down = time.monotonic() - stopped
        await light.stop()
        failed = heavy.errors + light.errors
        assert failed == [], failed[:3]
        survivor = replicas_of(cluster, namespace, "auto")[0]["metadata"]["name"]
        for sid, holder in holders.items():
            assert (await client.whoami(sid))["replica"] == survivor
            assert (sid in client._moved) == (holder != survivor)  # re-pinned, followed
    status = fsvc(cluster, namespace, "auto")["status"]
    assert status["autoscaler"]["reason"] == "ScaleDown", status["autoscaler"]
    assert status["autoscaler"]["desiredReplicas"] == 1
    decisions = [e["message"] for e in events(cluster, namespace, "auto") if "->" in e["message"]]
    print("decisions:", *decisions, sep="\n  ")
    reasons = {e["reason"] for e in events(cluster, namespace, "auto")}
    assert {"ScaleUp", "ScaleDown"} <= reasons, reasons
    # `kubeforge status fsvc/NAME` reads the same from the cluster, with the kubeconfig.
    shown = subprocess.run(
        [*KUBEFORGE, "status", "fsvc/auto", "-n", namespace, "--once"],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("auto: desired 1, replicas 1, ready 1"), shown.stdout
    assert "autoscaler: ScaleDown" in shown.stdout and survivor in shown.stdout, shown.stdout
    print(
        f"autoscaling: 1 -> 3 in {scaled_up:.1f}s (scaleUpDelay {up_delay}s), 3 -> 1 in "
        f"{scaled_down:.1f}s (scaleDownDelay {down_delay}s), {heavy.calls + light.calls} calls, "
        f"{len(failed)} failed, {len([s for s in sids if s in client._moved])} sessions moved"
    )


async def test_a_full_cluster_holds_at_one_pending_pod(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 6,
        "targetInFlight": 1,
        "scaleUpDelay": "2s",
        "scaleDownDelay": "5m",
    }
    deploy(cluster, namespace, "full", 1, gpus=1, autoscaling=autoscaling, **SLOW)
    url = router_url(cluster, namespace, "full")
    seen: set[str] = set()

    def pods() -> list[dict[str, Any]]:
        now = [
            p
            for p in replicas_of(cluster, namespace, "full")
            if not p["metadata"].get("deletionTimestamp")
        ]
        seen.update(p["metadata"]["uid"] for p in now)
        return now

    def pending(now: list[dict[str, Any]]) -> int:
        return sum(p["status"].get("phase") == "Pending" for p in now)

    def at_capacity() -> bool:
        now = pods()
        body = fsvc(cluster, namespace, "full")
        degraded = condition(body, "Degraded")
        return (
            sum(p["status"].get("phase") == "Running" for p in now) == 4
            and body.get("status", {}).get("readyReplicas") == 4
            and pending(now) <= 1
            and degraded.get("reason") == "AtCapacity"
        )

    async with ServiceClient(url, token=_token(cluster, namespace, "full")) as client:
        load = Load(client, 12)
        took = await _until(at_capacity, 60, "did not settle at 4 Ready and AtCapacity")
        # It stays there: no pod piles up, none is created and deleted over and over.
        created_by_then = len(seen)
        for _ in range(25):
            now = pods()
            assert pending(now) <= 1, [p["metadata"]["name"] for p in now]
            await asyncio.sleep(0.4)
        await load.stop()
    body = fsvc(cluster, namespace, "full")
    assert body["spec"]["replicas"] == 5  # four placed, one pending that says the node is full
    degraded = condition(body, "Degraded")
    assert "nvidia.com/gpu" in degraded["message"] or "Insufficient" in degraded["message"]
    assert len(seen) == created_by_then <= 6 + 1, len(seen)
    assert load.errors == [], load.errors[:3]
    print(f"full cluster: settled at 4 Ready + 1 Pending in {took:.1f}s, {len(seen)} pods made")
