"""Metrics as JSON (torchforge's summary keys) and Prometheus; msgpack bodies end to end."""

import asyncio
import re

import aiohttp
import msgpack

from tests.integration.conftest import call, start_session
from tests.integration.procs import Procs, http_get

SERVICE_KEYS = {
    "total_sessions",
    "healthy_replicas",
    "total_replicas",
    "total_request_rate",
    "avg_queue_depth",
    "avg_capacity_utilization",
    "sessions_per_replica",
}
REPLICA_KEYS = {
    "total_requests",
    "successful_requests",
    "failed_requests",
    "request_rate",
    "avg_latency",
    "active_requests",
    "queue_depth",
    "assigned_sessions",
    "capacity_utilization",
}


async def test_summary_reflects_the_calls_made(procs: Procs, http: aiohttp.ClientSession) -> None:
    replicas = procs.replicas("examples.slow:Slow", 3, "--max-concurrent-requests", "2")
    router = procs.router(replicas)
    await start_session(http, router.url)
    await asyncio.gather(*(call(http, router.url, "work", 0.01) for _ in range(30)))
    summary = http_get(router.url + "/v1/metrics/summary")[1]
    service = summary["service"]
    assert set(service) >= SERVICE_KEYS
    assert service["healthy_replicas"] == 3 and service["total_sessions"] == 1
    assert sorted(summary["replicas"]) == ["0", "1", "2"]  # keyed by replica index
    assert all(set(r) >= REPLICA_KEYS for r in summary["replicas"].values())
    assert sum(r["total_requests"] for r in summary["replicas"].values()) == 30
    assert service["total_request_rate"] > 0
    assert service["p50_latency"] >= 0.01  # latency is measured around the call, queue included
    # While calls queue on the replicas, the depth and utilisation show it.
    slow = [asyncio.create_task(call(http, router.url, "work", 0.8)) for _ in range(12)]
    await asyncio.sleep(0.5)
    busy = http_get(router.url + "/v1/metrics/summary")[1]["service"]
    await asyncio.gather(*slow)
    assert busy["avg_queue_depth"] >= 1.0 and busy["avg_capacity_utilization"] == 1.0


async def test_prometheus_counts_match_calls(procs: Procs, http: aiohttp.ClientSession) -> None:
    replica = procs.replica("examples.failing:Failing", "--kwargs", '{"fail": false}')
    router = procs.router([replica])
    for _ in range(4):
        await call(http, router.url, "ping")
    _, text = http_get(router.url + "/metrics")
    m = re.search(
        r'kubeforge_router_requests_total\{replica="replica-0",outcome="ok"\} (\S+)', text
    )
    assert m and float(m.group(1)) == 4.0
    _, text = http_get(replica.url + "/metrics")
    m = re.search(r'kubeforge_replica_requests_total\{endpoint="ping",outcome="ok"\} (\S+)', text)
    assert m and float(m.group(1)) == 4.0


async def test_msgpack_request_gets_msgpack_reply(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.echo:Echo", 2))
    payload = msgpack.packb({"args": [{"blob": b"\x00\xff", "n": [1, 2]}]})
    headers = {"Content-Type": "application/msgpack"}
    async with http.post(f"{router.url}/v1/call/echo", data=payload, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "application/msgpack"
        assert msgpack.unpackb(await resp.read()) == {"result": {"blob": b"\x00\xff", "n": [1, 2]}}
    async with http.post(f"{router.url}/v1/call_all/echo", data=payload, headers=headers) as resp:
        body = msgpack.unpackb(await resp.read())
        assert body["results"] == [{"blob": b"\x00\xff", "n": [1, 2]}] * 2


async def test_result_json_cannot_carry_is_a_clear_error_not_a_crash(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router([procs.replica("examples.failing:Failing")])
    status, body, _ = await call(http, router.url, "raw")
    assert status == 500 and body["error"]["type"] == "TypeError"
    assert "cannot be sent as JSON" in body["error"]["message"]
    async with http.post(
        f"{router.url}/v1/call/raw",
        data=msgpack.packb({}),
        headers={"Content-Type": "application/msgpack"},
    ) as resp:
        assert msgpack.unpackb(await resp.read()) == {"result": b"\x00\xff"}
    assert (await call(http, router.url, "ping"))[1]["result"] == "pong"
