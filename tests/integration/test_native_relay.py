"""The native relay: calls that need no decision are answered in Rust, the rest in Python."""

import aiohttp

from kubeforge import values, wire
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


def _counters(procs: Procs, *flags: str) -> tuple[list, object]:
    replicas = [
        procs.replica("examples.counter:Counter", "--kwargs", f'{{"start": {i * 100}}}')
        for i in range(3)
    ]
    return replicas, procs.router(replicas, *flags)


async def _broadcast(
    http: aiohttp.ClientSession, url: str, endpoint: str, fmt: str = wire.FMT_JSON
) -> tuple[int, dict]:
    body = wire.encode_as({"args": [], "kwargs": {}}, fmt)
    data = body.tobytes() if isinstance(body, values.Encoded) else body
    headers = {"content-type": wire.content_type(fmt).decode()}
    async with http.post(f"{url}/v1/call_all/{endpoint}", data=data, headers=headers) as resp:
        # Errors come as JSON to a binary-format caller: read the answer in its own format.
        answered = wire.body_format(resp.headers["content-type"].encode())
        answer = wire.decode_as(bytearray(await resp.read()), answered)
    if fmt == wire.FMT_BINARY and "results" in answer:  # replies nested whole: {"result": ...}
        answer["results"] = [r if r is None else r["result"] for r in answer["results"]]
    return resp.status, answer


async def test_a_broadcast_is_answered_in_rust(procs: Procs, http: aiohttp.ClientSession) -> None:
    _, router = _counters(procs)
    names = ["replica-0", "replica-1", "replica-2"]
    for n, fmt in enumerate(wire.FORMAT_NAMES, 1):
        status, body = await _broadcast(http, router.url, "incr", fmt)
        assert status == 200, body
        assert body == {"results": [n, 100 + n, 200 + n], "replicas": names, "errors": {}}, fmt
    # Three broadcasts relayed, none handed to Python; every replica's calls counted.
    assert _relay(router.url) == {"kind": "native", "relayed": 3, "handed_over": 0}
    metrics = http_get(router.url + "/v1/metrics")[1]
    assert [r["total_requests"] for r in metrics["replicas"].values()] == [3, 3, 3]


async def test_a_broadcast_a_replica_missed_is_answered_from_the_relays_outcomes(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas, router = _counters(procs, "--health-poll-rate", "10s")  # the broadcast finds it
    await _broadcast(http, router.url, "incr")  # pooled connections to each
    replicas[1].kill9()
    status, body = await _broadcast(http, router.url, "incr")
    assert status == 200
    assert body["results"] == [2, None, 202]
    assert list(body["errors"]) == ["replica-1"]
    assert body["errors"]["replica-1"]["type"] in ("ReplicaLostError", "NoHealthyReplicasError")
    assert _relay(router.url)["handed_over"] == 1
    # Python took the relay's word for the replica's health, and the call was sent once: the
    # replicas that answered counted it once (Python sent nothing again).
    states = [r["state"] for r in http_get(router.url + "/v1/replicas")[1]]
    assert states == ["HEALTHY", "UNHEALTHY", "HEALTHY"]
    status, body = await _broadcast(http, router.url, "value")
    assert (status, body["results"], body["replicas"]) == (
        200,
        [2, 202],
        ["replica-0", "replica-2"],
    )


async def test_a_broadcast_every_replica_refused_is_one_error(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    _, router = _counters(procs)
    for fmt in wire.FORMAT_NAMES:
        status, body = await _broadcast(http, router.url, "nope", fmt)
        assert status == 404 and body["error"]["type"] == "UnknownEndpointError", fmt
    # Sent by the relay, answered by Python from the replicas' refusals.
    assert _relay(router.url) == {"kind": "native", "relayed": 0, "handed_over": 3}
