"""SPMD replicas on Kubernetes, through the router: `procs: 2` (two ranks in one pod, one GPU
each) and `hosts: 2` (a replica of two pods, replaced together). On the process node and on
kind alike."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from kubeforge import KubeforgeError, ServiceClient
from tests.e2e.conftest import ExternalCluster, Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import (
    _eq,
    _token,
    _until,
    deploy,
    fsvc,
    replica_pods,
    router_url,
)

pytestmark = pytest.mark.timeout(300)
ACTOR = "examples.spmd:RankCounter"


def replicas_of(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return sorted(
        (
            p
            for p in replica_pods(cluster, ns, name)
            if p["metadata"]["labels"]["kubeforge.dev/component"] == "replica"
            and not p["metadata"].get("deletionTimestamp")
        ),
        key=lambda p: p["metadata"]["name"],
    )


async def healthz(cluster: Any, ns: str, pod: dict[str, Any]) -> dict[str, Any]:
    """The replica's own /healthz, in the scheme its port is named for (TLS is on by default;
    its certificate is for its routers, so it is not verified here). On kind, from inside the
    pod: its NetworkPolicy lets only its routers connect from elsewhere."""
    scheme = pod["spec"]["containers"][0]["ports"][0]["name"]
    if isinstance(cluster, ExternalCluster):
        read = (
            "import ssl, urllib.request as u; "
            f"print(u.urlopen('{scheme}://127.0.0.1:8000/healthz', "
            "context=ssl._create_unverified_context()).read().decode())"
        )
        name = pod["metadata"]["name"]
        out = cluster.kubectl("exec", "-n", ns, name, "-c", "replica", "--", "python", "-c", read)
        return dict(json.loads(out.stdout))
    url = f"{scheme}://{pod['status']['podIP']}:8000/healthz"
    async with aiohttp.ClientSession() as http, http.get(url, ssl=False) as resp:
        return dict(await resp.json())


def kill9(cluster: Any, ns: str, pod: str, pid: int) -> None:
    """SIGKILL one process of a pod: here on the process node, through exec on kind."""
    if isinstance(cluster, ExternalCluster):
        kill = f"import os; os.kill({pid}, 9)"
        cluster.kubectl("exec", "-n", ns, pod, "-c", "replica", "--", "python", "-c", kill)
    else:
        os.kill(pid, signal.SIGKILL)


async def _client_for(cluster: Any, ns: str, name: str, **kw: Any) -> ServiceClient:
    return ServiceClient(router_url(cluster, ns, name), token=_token(cluster, ns, name), **kw)


async def test_procs_2_ranks_share_a_pod_and_restart_together(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    started = time.monotonic()
    deploy(cluster, namespace, "spmd", 2, gpus=2, actor=ACTOR, procs=2, healthPollRate="200ms")
    print(f"procs: 2 -> 2 replicas Ready in {time.monotonic() - started:.1f}s")
    pods = replicas_of(cluster, namespace, "spmd")
    assert [p["metadata"]["name"] for p in pods] == ["spmd-replica-0", "spmd-replica-1"]
    limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "2"
    async with await _client_for(cluster, namespace, "spmd") as client:

        async def states() -> list[str]:
            return [r["state"] for r in await client.replicas()]

        await _until(lambda: _eq(states(), ["HEALTHY"] * 2), 30, "2 healthy replicas")
        sid = await client.start_session()
        for n in range(1, 4):
            assert await client.incr(sid) == {"rank": 0, "calls": n}
        client.return_first_rank_result = False
        envs = await client.env(sid)
        assert [(e["rank"], e["local_rank"], e["world_size"]) for e in envs] == [
            ("0", "0", "2"),
            ("1", "1", "2"),
        ]
        assert [e["calls"] for e in envs] == [3, 3]  # every rank ran every call
        assert [e["cuda_visible_devices"] for e in envs] == ["0", "1"]  # one GPU each
        holder = pods[0] if envs[0]["master_addr"] == pods[0]["status"]["podIP"] else pods[1]
        assert {e["master_addr"] for e in envs} == {holder["status"]["podIP"]}
        client.return_first_rank_result = True
        tags = [f"t{i}" for i in range(40)]
        gathered = await asyncio.gather(*(client.gather(None, t) for t in tags))
        assert gathered == [[{"rank": 0, "tag": t}, {"rank": 1, "tag": t}] for t in tags]

        # kill -9 of rank 1: the replica leaves rotation, restarts both ranks, rejoins; calls
        # without a session see no error, the session is re-pinned.
        ranks = (await healthz(cluster, namespace, holder))["ranks"]
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await client.gather(None, "load")
                except KubeforgeError as exc:
                    errors.append(exc)

        workers = [asyncio.create_task(load()) for _ in range(2)]
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        kill9(cluster, namespace, holder["metadata"]["name"], ranks[1]["pid"])
        name = holder["metadata"]["name"]

        async def out_of_rotation() -> bool:
            return not any(
                r["name"] == name and r["state"] == "HEALTHY" for r in await client.replicas()
            )

        await _until(out_of_rotation, 5, "left rotation")
        left = time.monotonic() - killed
        await _until(lambda: _eq(states(), ["HEALTHY"] * 2), 60, "rejoined")
        rejoined = time.monotonic() - killed
        stop.set()
        await asyncio.gather(*workers)
        assert errors == []
        assert left <= 0.2 + 1.0, left
        after = (await healthz(cluster, namespace, holder))["ranks"]
        assert {r["pid"] for r in after}.isdisjoint({r["pid"] for r in ranks})
        assert await client.incr(sid) == {"rank": 0, "calls": 1} or sid in client._moved
        print(f"rank 1 killed: out of rotation after {left:.2f}s, rejoined after {rejoined:.1f}s")
    # The pod itself was not replaced: its launcher restarted the ranks.
    assert [p["metadata"]["uid"] for p in replicas_of(cluster, namespace, "spmd")] == [
        p["metadata"]["uid"] for p in pods
    ]


async def test_hosts_2_is_one_replica_of_two_pods_replaced_together(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    started = time.monotonic()
    deploy(cluster, namespace, "duo", 1, gpus=0, actor=ACTOR, hosts=2, healthPollRate="200ms")
    print(f"hosts: 2 -> 1 replica of 2 pods Ready in {time.monotonic() - started:.1f}s")
    pods = replicas_of(cluster, namespace, "duo")
    assert [p["metadata"]["name"] for p in pods] == ["duo-replica-0", "duo-replica-0-1"]
    status = fsvc(cluster, namespace, "duo")["status"]
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)  # replicas, not pods
    row = cluster.kubectl("get", "fsvc", "duo", "-n", namespace).stdout.splitlines()[1].split()
    assert row[1:3] == ["1", "1"], row  # DESIRED, READY
    leader_ip = pods[0]["status"]["podIP"]
    async with await _client_for(cluster, namespace, "duo", return_first_rank_result=False) as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"]), 30, "the replica is healthy")
        assert [r["name"] for r in await c.replicas()] == ["duo-replica-0"]  # leaders only
        envs = await c.env(None)
        assert [
            (e["rank"], e["local_rank"], e["world_size"], e["local_world_size"]) for e in envs
        ] == [
            ("0", "0", "2", "1"),
            ("1", "0", "2", "1"),
        ]
        assert {e["master_addr"] for e in envs} == {leader_ip}  # rank 0's pod, for both
        assert await c.gather(None, "x") == [[{"rank": 0, "tag": "x"}, {"rank": 1, "tag": "x"}]] * 2
    # Losing one pod of the group restarts the group: both pods are replaced.
    old = {p["metadata"]["uid"] for p in pods}
    cluster.kubectl("delete", "pod", "-n", namespace, "duo-replica-0-1", "--wait=false")

    def replaced() -> bool:
        now = replicas_of(cluster, namespace, "duo")
        body = fsvc(cluster, namespace, "duo")
        return (
            len(now) == 2
            and not old & {p["metadata"]["uid"] for p in now}
            and body.get("status", {}).get("readyReplicas") == 1
        )

    wait_for(replaced, 120)
    events = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.name=duo",
        "-o",
        "json",
    ).stdout
    assert "GroupRestart" in {e["reason"] for e in json.loads(events)["items"]}
    async with await _client_for(cluster, namespace, "duo") as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"]), 30, "healthy again")
        assert await c.gather(None, "y") == [{"rank": 0, "tag": "y"}, {"rank": 1, "tag": "y"}]


async def _states(client: ServiceClient) -> list[str]:
    return [r["state"] for r in await client.replicas()]
