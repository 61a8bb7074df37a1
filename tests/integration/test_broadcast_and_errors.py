"""Broadcast order and per-replica errors; endpoint errors reach the caller typed."""

import aiohttp

from tests.integration.conftest import call
from tests.integration.procs import Procs, http_get


async def test_broadcast_returns_one_result_per_replica_in_order(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = [
        procs.replica("examples.counter:Counter", "--kwargs", f'{{"start": {i * 100}}}')
        for i in range(3)
    ]
    router = procs.router(replicas)
    async with http.post(f"{router.url}/v1/call_all/incr", json={"args": [1]}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {
        "results": [1, 101, 201],
        "errors": {},
        "replicas": ["replica-0", "replica-1", "replica-2"],
    }


async def test_broadcast_names_the_replica_whose_endpoint_raised(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = [
        procs.replica(
            "examples.failing:Failing", "--kwargs", f'{{"fail": {"true" if i == 1 else "false"}}}'
        )
        for i in range(3)
    ]
    router = procs.router(replicas)
    async with http.post(
        f"{router.url}/v1/call_all/maybe_fail", json={"kwargs": {"message": "replica says no"}}
    ) as resp:
        body = await resp.json()
    assert body["results"] == ["ok", None, "ok"]
    assert list(body["errors"]) == ["replica-1"]
    assert body["errors"]["replica-1"]["type"] == "ValueError"
    assert body["errors"]["replica-1"]["message"] == "replica says no"


async def test_broadcast_with_only_caller_errors_is_one_4xx(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.counter:Counter", 2))
    async with http.post(f"{router.url}/v1/call_all/nope", json={}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "UnknownEndpointError"


async def test_endpoint_error_reaches_caller_and_replica_stays_in_rotation(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica("examples.failing:Failing")
    router = procs.router([replica])
    for _ in range(5):
        status, body, _ = await call(http, router.url, "maybe_fail", message="bad input!")
        assert status == 500
        assert body["error"]["type"] == "ValueError"
        assert body["error"]["message"] == "bad input!"
        assert body["error"]["origin"] == "endpoint"
        assert "Traceback" in body["error"]["traceback"]
    status, body, _ = await call(http, router.url, "ping")
    assert (status, body["result"]) == (200, "pong")
    replicas = http_get(router.url + "/v1/replicas")[1]
    assert replicas[0]["state"] == "HEALTHY"
    assert replicas[0]["failed_requests"] == 5


async def test_an_endpoints_own_timeout_error_is_its_error_not_a_call_timeout(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router([procs.replica("examples.failing:Failing")])
    status, body, _ = await call(http, router.url, "own_timeout")
    assert status == 500
    assert body["error"]["type"] == "TimeoutError" and body["error"]["origin"] == "endpoint"
    assert body["error"]["message"] == "upstream model server timed out"
