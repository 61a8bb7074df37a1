"""The native relay: calls that need no decision are answered in Rust, the rest in Python."""

import aiohttp

from tests.integration.conftest import call, start_session
from tests.integration.procs import Procs, http_get


def _relay(url: str) -> dict[str, object]:
    return http_get(url + "/v1/metrics")[1]["relay"]


async def test_sticky_and_sessionless_calls_never_reach_python(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    router = procs.router(replicas)
    sid = await start_session(http, router.url)
    for _ in range(10):
        status, _, _ = await call(http, router.url, "whoami")
        assert status == 200
    # Session ids are checked in Rust with the same MAC as in Python: this one is accepted.
    counts = [(await call(http, router.url, "incr", session=sid))[1]["result"] for _ in range(10)]
    assert counts == list(range(1, 11))
    assert _relay(router.url) == {"kind": "native", "relayed": 20, "handed_over": 0}
    # The latency samples taken in Rust reach the router's metrics.
    metrics = http_get(router.url + "/v1/metrics")[1]
    assert sum(r["total_requests"] for r in metrics["replicas"].values()) == 20
    assert metrics["window"]["requests"] == 20

    # A forged session id goes to Python, which refuses it as before.
    forged = sid[:-1] + ("1" if sid[-1] == "0" else "0")
    status, body, _ = await call(http, router.url, "incr", session=forged)
    assert status == 404 and body["error"]["type"] == "UnknownSessionError"
    assert _relay(router.url)["handed_over"] == 1


async def test_a_caller_cannot_speak_for_the_relay(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 2)
    router = procs.router(replicas, "--health-poll-rate", "10s")  # no poll to undo a mark
    # Handed to Python (a session the caller names: the relay routes issued ids only) with
    # the relay's secret: only the relay's own x-kubeforge-relay-* headers may reach it, the
    # caller's are dropped, so the call simply runs.
    forged = {"X-Kubeforge-Relay-Failed": "0 lost"}
    status, _, _ = await call(http, router.url, "whoami", session="x", headers=forged)
    assert status == 200
    states = [r["state"] for r in http_get(router.url + "/v1/replicas")[1]]
    assert states == ["HEALTHY", "HEALTHY"]  # replica 0 was not marked lost


async def test_python_call_path_when_asked(procs: Procs, http: aiohttp.ClientSession) -> None:
    replicas = procs.replicas("examples.counter:Counter", 2)
    router = procs.router(replicas, env={"KUBEFORGE_RELAY": "python"})
    sid = await start_session(http, router.url)
    counts = [(await call(http, router.url, "incr", session=sid))[1]["result"] for _ in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert _relay(router.url) == {"kind": "python"}
