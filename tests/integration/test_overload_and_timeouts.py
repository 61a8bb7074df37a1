"""Concurrency limits, bounded queues and timeouts: every wait ends with a clear answer."""

import asyncio
import time

import aiohttp

from tests.integration.conftest import call, start_session
from tests.integration.procs import Procs, http_get


async def test_calls_queue_beyond_the_limit_and_are_refused_beyond_the_queue(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica(
        "examples.slow:Slow", "--max-concurrent-requests", "2", "--max-queued-requests", "2"
    )
    started = time.monotonic()
    outcomes = await asyncio.gather(*(call(http, replica.url, "work", 0.5) for _ in range(6)))
    elapsed = time.monotonic() - started
    statuses = sorted(o[0] for o in outcomes)
    assert statuses == [200, 200, 200, 200, 503, 503]
    refused = [o[1]["error"] for o in outcomes if o[0] == 503]
    assert all(e["type"] == "OverloadedError" and "at capacity" in e["message"] for e in refused)
    assert all(
        o[2].get("X-Kubeforge-Retryable") == "OverloadedError" for o in outcomes if o[0] == 503
    )
    # Two ran at once, two waited for them: about two delays in all, not one and not four.
    assert 0.9 < elapsed < 1.8


async def test_router_sends_overflow_to_another_replica(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas(
        "examples.slow:Slow", 2, "--max-concurrent-requests", "1", "--max-queued-requests", "0"
    )
    router = procs.router(replicas)
    outcomes = await asyncio.gather(*(call(http, router.url, "work", 0.3) for _ in range(2)))
    assert [o[0] for o in outcomes] == [200, 200]
    # With both busy, a third call is refused with the replica's overload error.
    outcomes = await asyncio.gather(*(call(http, router.url, "work", 0.5) for _ in range(3)))
    assert sorted(o[0] for o in outcomes) == [200, 200, 503]


async def test_call_past_its_timeout_gets_a_timeout_error(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica("examples.slow:Slow", "--request-timeout", "300ms")
    router = procs.router([replica])
    for base in (replica.url, router.url):
        started = time.monotonic()
        status, body, _ = await call(http, base, "work", 5.0)
        assert status == 504 and body["error"]["type"] == "RequestTimeoutError"
        assert time.monotonic() - started < 2.0
    # A sync endpoint in a thread times out the same way.
    status, body, _ = await call(http, replica.url, "block", 1.0)
    assert status == 504
    # The caller can ask for less time than the replica's limit.
    status, body, _ = await call(
        http, router.url, "work", 1.0, headers={"X-Kubeforge-Timeout": "0.1"}
    )
    assert status == 504
    status, body, _ = await call(http, router.url, "work", 0.01)
    assert status == 200


async def test_router_ends_a_call_past_its_own_timeout(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.slow:Slow", 2)  # replicas would wait 60 s
    router = procs.router(replicas, "--request-timeout", "300ms")
    started = time.monotonic()
    status, body, _ = await call(http, router.url, "work", 3.0)
    assert status == 504 and body["error"]["type"] == "RequestTimeoutError"
    assert "did not answer within 0.3s" in body["error"]["message"]
    assert time.monotonic() - started < 2.0  # not re-sent to the other replica either
    status, body, _ = await call(http, router.url, "work", 0.01)
    assert status == 200


async def test_sigterm_drains_running_calls_then_exits(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica("examples.slow:Slow", "--drain-grace", "5s")
    calls = [asyncio.create_task(call(http, replica.url, "work", 0.6)) for _ in range(3)]
    await asyncio.sleep(0.2)
    replica.term()
    await asyncio.sleep(0.1)
    async with http.get(replica.url + "/readyz") as resp:
        assert resp.status == 503
    outcomes = await asyncio.gather(*calls)
    assert [o[0] for o in outcomes] == [200, 200, 200]
    await asyncio.get_running_loop().run_in_executor(None, replica.popen.wait, 5)
    assert replica.popen.returncode == 0


async def test_router_sigterm_finishes_running_calls_then_exits(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.slow:Slow", 2))
    sid = await start_session(http, router.url)
    calls = [
        asyncio.create_task(call(http, router.url, "work", 0.8)),
        asyncio.create_task(call(http, router.url, "work", 0.8, session=sid)),
    ]
    await asyncio.sleep(0.3)
    router.term()
    outcomes = await asyncio.gather(*calls)
    assert [(o[0], o[1]["result"]) for o in outcomes] == [(200, 0.8), (200, 0.8)]
    await asyncio.get_running_loop().run_in_executor(None, router.popen.wait, 5)
    assert router.popen.returncode == 0


async def test_router_sends_a_refused_call_elsewhere(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # No queue, one slot; the router's polls are too slow to see the other caller's load.
    replicas = procs.replicas(
        "examples.slow:Slow", 2, "--max-concurrent-requests", "1", "--max-queued-requests", "0"
    )
    router = procs.router(replicas, "--health-poll-rate", "10s")
    busy = asyncio.create_task(call(http, replicas[0].url, "work", 2.0))  # around the router
    await asyncio.sleep(0.3)
    outcomes = [await call(http, router.url, "work", 0.01) for _ in range(6)]
    assert [o[0] for o in outcomes] == [200] * 6  # the refused ones ran on replica 1
    assert http_get(router.url + "/v1/metrics")[1]["service"]["retries"] >= 1
    assert (await busy)[0] == 200


async def test_a_draining_replica_hands_its_sessions_on(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.slow:Slow", 2, "--drain-grace", "5s")
    router = procs.router(replicas, "--health-poll-rate", "10s")  # found by the refusal alone
    sessions = [await start_session(http, router.url) for _ in range(2)]
    doomed = next(s for s in sessions if s.startswith("0."))  # the id names its replica
    for _ in range(3):  # pooled connections to replica 0 exist now
        assert (await call(http, router.url, "work", 0.0, session=doomed))[0] == 200
    # A long call keeps replica 0 alive while it drains; new calls get 503 DrainingError.
    running = asyncio.create_task(call(http, replicas[0].url, "work", 1.5))
    await asyncio.sleep(0.2)
    replicas[0].term()
    await asyncio.sleep(0.2)
    status, _, headers = await call(http, router.url, "work", 0.0, session=doomed)
    assert status == 200
    assert headers.get("X-Kubeforge-Session-Moved-From") == doomed
    assert headers["X-Kubeforge-Session"].startswith("1.")
    lost = http_get(router.url + "/v1/replicas")[1][0]
    assert (lost["state"], lost["reason"]) == ("UNHEALTHY", "draining")
    assert (await running)[0] == 200  # and the running call finished
