"""The one re-send rule holds on both call paths (the integration tier runs this file with the
native relay and again with KUBEFORGE_RELAY=python)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.integration.conftest import call
from tests.integration.procs import Procs, http_get


async def _wait_unhealthy(router_url: str, name: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = http_get(router_url + "/v1/replicas")
        assert isinstance(body, list), body
        states = {r["name"]: r["state"] for r in body}
        if states.get(name) not in (None, "HEALTHY"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} still HEALTHY at the router: {states}")


async def test_retries_zero_never_sends_a_call_again(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    """--retries 0: a call whose replica refuses the connection fails; it is not re-sent."""
    replicas = procs.replicas("examples.echo:Echo", 2)
    # Health polls far apart: the router learns of the death only from the call itself.
    router = procs.router(replicas, "--retries", "0", "--health-poll-rate", "60s")
    replicas[1].kill9()
    outcomes = [await call(http, router.url, "echo", i) for i in range(4)]
    failed = [o for o in outcomes if o[0] != 200]
    assert len(failed) == 1, outcomes  # the one call that met the dead replica
    status, body, _ = failed[0]
    assert (status, body["error"]["type"]) in {
        (503, "NoHealthyReplicasError"),
        (502, "ReplicaLostError"),
    }, body
    assert "retry budget of 0 spent" in body["error"]["message"]
    _, metrics = http_get(router.url + "/v1/metrics")
    assert isinstance(metrics, dict) and metrics["service"]["retries"] == 0


async def test_last_healthy_replica_overloaded_gives_its_own_error(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Nowhere else to go: the caller gets the replica's OverloadedError, on either path."""
    replicas = procs.replicas(
        "examples.slow:Slow", 2, "--max-concurrent-requests", "1", "--max-queued-requests", "0"
    )
    router = procs.router(replicas, "--health-poll-rate", "100ms")
    replicas[1].kill9()
    await _wait_unhealthy(router.url, "replica-1")
    busy = asyncio.ensure_future(call(http, router.url, "work", 1.0))
    await asyncio.sleep(0.3)
    status, body, headers = await call(http, router.url, "work", 0.1)
    assert (status, body["error"]["type"]) == (503, "OverloadedError"), body
    assert "at capacity" in body["error"]["message"]
    assert headers.get("X-Kubeforge-Retryable") == "OverloadedError"
    assert (await busy)[0] == 200


async def test_last_healthy_replica_draining_gives_its_own_error(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.slow:Slow", 2)
    router = procs.router(replicas, "--health-poll-rate", "5s")
    replicas[1].kill9()
    status, _, _ = await call(http, router.url, "work", 0.01)  # may meet r1: then marks it
    await _wait_unhealthy(router.url, "replica-1", timeout=8.0)
    busy = asyncio.ensure_future(call(http, router.url, "work", 1.5))
    await asyncio.sleep(0.3)
    replicas[0].term()  # drains: finishes the running call, refuses new ones
    await asyncio.sleep(0.2)
    status, body, _ = await call(http, router.url, "work", 0.1)
    assert (status, body["error"]["type"]) == (503, "DrainingError"), body
    assert (await busy)[0] == 200


async def test_an_endpoints_own_overloaded_error_is_not_a_refusal(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    """The endpoint ran and raised OverloadedError itself: its error, never re-sent."""
    replicas = procs.replicas("examples.failing:Failing", 2)
    router = procs.router(replicas)
    status, body, headers = await call(http, router.url, "refuse")
    assert status == 500, body
    assert (body["error"]["type"], body["error"]["origin"]) == ("OverloadedError", "endpoint")
    assert "X-Kubeforge-Retryable" not in headers
    _, metrics = http_get(router.url + "/v1/metrics")
    assert isinstance(metrics, dict) and metrics["service"]["retries"] == 0
    assert metrics["service"]["healthy_replicas"] == 2


async def _running_on(replicas: list, timeout: float = 3.0) -> int:
    """Index of the replica that is running a call now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, r in enumerate(replicas):
            _, health = http_get(r.url + "/healthz")
            if isinstance(health, dict) and health.get("in_flight"):
                return i
        await asyncio.sleep(0.02)
    raise AssertionError("no replica took the call")


async def test_a_re_send_gets_what_is_left_of_the_callers_timeout(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    """A call lost with its replica goes elsewhere with the rest of the caller's time, not
    all of it again: here too little is left, so the caller hears 504 when its time is up."""
    replicas = procs.replicas("examples.slow:Slow", 2)
    router = procs.router(replicas, "--health-poll-rate", "5s")
    started = time.monotonic()
    pending = asyncio.ensure_future(
        call(http, router.url, "work", 0.8, headers={"X-Kubeforge-Timeout": "1.2"})
    )
    victim = await _running_on(replicas)
    await asyncio.sleep(max(0.0, 0.6 - (time.monotonic() - started)))
    replicas[victim].kill9()
    status, body, _ = await pending
    elapsed = time.monotonic() - started
    assert (status, body["error"]["type"]) == (504, "RequestTimeoutError"), body
    assert elapsed < 1.6, elapsed  # the whole call kept to the caller's 1.2 s
    _, metrics = http_get(router.url + "/v1/metrics")
    assert isinstance(metrics, dict) and metrics["service"]["retries"] == 1
