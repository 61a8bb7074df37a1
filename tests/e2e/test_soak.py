"""A bounded soak: steady calls while replicas, router pods and the operator are killed at
random, then the invariants that must hold whatever the order of the faults.

KUBEFORGE_SOAK_SECONDS sets the length (150 s by default); KUBEFORGE_SOAK_SEED replays a run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from typing import Any

import pytest

from kubeforge import KubeforgeError, ServiceClient
from kubeforge.contract import L_INDEX
from kubeforge.operator.manifests import ROUTER_PORT
from tests.e2e.conftest import Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_faults import Sampler
from tests.e2e.test_operator import _router_pods, _token, fsvc, ready, replica_pods, service

SECONDS = float(os.environ.get("KUBEFORGE_SOAK_SECONDS", "150"))
pytestmark = pytest.mark.timeout(SECONDS + 300)


class IndexWatch(Sampler):
    """No replica index may ever belong to two pods at once (terminating ones included)."""

    period = 0.5

    def __init__(self, cluster: Any, namespace: str, name: str) -> None:
        super().__init__(cluster, namespace, name)
        self.doubles: list[dict[str, list[str]]] = []

    def sample(self) -> None:
        owners: dict[str, list[str]] = collections.defaultdict(list)
        for p in replica_pods(self.cluster, self.namespace, self.name):
            index = p["metadata"]["labels"].get(L_INDEX)
            if index is not None:
                owners[index].append(p["metadata"]["name"])
        if any(len(names) > 1 for names in owners.values()):
            self.doubles.append(dict(owners))


async def test_soak_with_random_faults(cluster: Any, namespace: str, operator: Operator) -> None:
    seed = int(os.environ.get("KUBEFORGE_SOAK_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    name, replicas = "soak", 3
    spec = service(name, replicas, gpus=1, router={"replicas": 2}, drainGrace="2s")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
    wait_for(lambda: len(_router_pods(cluster, namespace, name)) == 2, 120)
    wait_for(lambda: fsvc(cluster, namespace, name).get("status", {}).get("healthyReplicas") == 3)
    routers = _router_pods(cluster, namespace, name)
    urls = [f"http://{p['status']['podIP']}:{ROUTER_PORT}" for p in routers]
    faults: collections.Counter[str] = collections.Counter()
    failed: dict[str, list[str]] = {"without a session": [], "in a session": []}
    calls = 0
    stop = asyncio.Event()

    async with ServiceClient(urls, token=_token(cluster, namespace, name)) as client:

        async def caller(in_session: bool) -> None:
            nonlocal calls
            sid = await client.start_session() if in_session else None
            while not stop.is_set():
                try:
                    await client.whoami(sid)
                    calls += 1
                except KubeforgeError as exc:
                    kind = "in a session" if sid else "without a session"
                    failed[kind].append(f"{time.monotonic():.1f} {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.005)

        def settled() -> bool:
            """every replica Ready and both router pods Ready (the next fault may come)"""
            pods = replica_pods(cluster, namespace, name)
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            return len(live) == replicas + 2 and all(ready(p) for p in live)

        async def inject() -> None:
            end = time.monotonic() + SECONDS
            while time.monotonic() < end:
                await asyncio.sleep(rng.uniform(2, 6))
                await asyncio.to_thread(wait_for, settled, 120, 0.5)
                what = rng.choice(["replica", "router", "operator"])
                if what == "operator":
                    await asyncio.to_thread(operator.kill9)
                    await asyncio.to_thread(operator.start)
                    faults["operator"] += 1
                    continue
                pods = (
                    _router_pods(cluster, namespace, name)
                    if what == "router"
                    else [
                        p
                        for p in replica_pods(cluster, namespace, name)
                        if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"
                    ]
                )
                victim = rng.choice(pods)["metadata"]["name"]
                await asyncio.to_thread(cluster.kill_container, namespace, victim, what)
                faults[what] += 1

        with IndexWatch(cluster, namespace, name) as indices:
            callers = [asyncio.create_task(caller(s)) for s in (False, False, True, True)]
            try:
                await inject()
                await asyncio.to_thread(wait_for, settled, 120, 0.5)
                await asyncio.sleep(2)  # calls after the last fault, on a settled Service
            finally:
                stop.set()
                await asyncio.gather(*callers)

    def converged() -> bool:
        """status matches the spec: observed generation, ready and healthy replicas, Ready"""
        body = fsvc(cluster, namespace, name)
        status = body.get("status", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return (
            status.get("observedGeneration") == body["metadata"]["generation"]
            and status.get("readyReplicas") == replicas
            and status.get("healthyReplicas") == replicas
            and conditions.get("Ready") == "True"
        )

    wait_for(converged, 60)
    total = sum(faults.values())
    report = (
        f"seed {seed}: {total} faults ({dict(faults)}), {calls} calls, "
        f"{len(failed['without a session'])} failed without a session, "
        f"{len(failed['in a session'])} in a session, {indices.samples} index samples"
    )
    print(f"[soak] {report}")
    assert total >= SECONDS / 15, report
    assert not indices.doubles, indices.doubles[:2]
    # The at-most-once rule: only a call in a session may fail, and only one cut short by the
    # death of its replica or router (at most one per session caller per fault).
    assert failed["without a session"] == [], (report, failed["without a session"][:3])
    assert len(failed["in a session"]) <= 2 * total, (report, failed["in a session"][:5])
