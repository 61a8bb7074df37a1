"""kill -9 of a replica: it leaves rotation fast, calls keep working, its sessions move visibly."""

import asyncio
import re
import time

import aiohttp

from tests.integration.conftest import call, start_session
from tests.integration.procs import Procs, http_get

POLL = 0.2


async def _left_rotation_after(router_url: str, name: str, since: float) -> float:
    while time.monotonic() - since < 5.0:
        states = {r["name"]: r["state"] for r in http_get(router_url + "/v1/replicas")[1]}
        if states[name] != "HEALTHY":
            return time.monotonic() - since
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} still HEALTHY 5 s after kill -9")


async def test_idle_replica_killed_leaves_rotation_within_poll_rate(procs: Procs) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    router = procs.router(replicas, "--health-poll-rate", f"{POLL}")
    killed = time.monotonic()
    replicas[2].kill9()
    took = await _left_rotation_after(router.url, "replica-2", killed)
    assert took <= POLL + 0.5, took  # found by the active health poll: no call went there


async def test_kill9_under_load(procs: Procs, http: aiohttp.ClientSession) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    router = procs.router(replicas, "--health-poll-rate", f"{POLL}")
    pid_of = {r.pid: f"replica-{i}" for i, r in enumerate(replicas)}

    sessions = [await start_session(http, router.url) for _ in range(12)]
    holder = {}
    for sid in sessions:
        _, body, _ = await call(http, router.url, "whoami", session=sid)
        holder[sid] = pid_of[body["result"]["pid"]]
    victim = replicas[1]
    doomed = [s for s in sessions if holder[s] == "replica-1"]
    assert len(doomed) == 4

    outcomes: list[tuple[float, int, str]] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            started = time.monotonic()
            status, body, _ = await call(http, router.url, "whoami")
            outcomes.append((started, status, body.get("error", {}).get("type", "")))

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    victim.kill9()
    took = await _left_rotation_after(router.url, "replica-1", killed)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), 10)

    assert took <= POLL + 0.5, took
    after = [o for o in outcomes if o[0] > killed]
    assert len(after) > 100, "the load must keep running after the kill"
    # Calls without a session see no error: those cut short on the dead replica ran again
    # on a survivor (DESIGN §3), the rest never went there.
    failed = [o for o in outcomes if o[1] != 200]
    assert failed == []
    retried = http_get(router.url + "/v1/metrics")[1]["service"]["retries"]
    assert retried >= 1, "the calls in flight on the killed replica must have been re-sent"

    # One caller asks to be told explicitly when its session moves.
    status, body, _ = await call(
        http, router.url, "incr", session=doomed[0], headers={"X-Kubeforge-Session-Moved": "error"}
    )
    assert status == 409 and body["error"]["type"] == "SessionMovedError"
    assert body["error"]["session_id"] != doomed[0]

    # The others just keep calling: the call works and says where the session went.
    new_homes = []
    for sid in doomed[1:]:
        status, body, headers = await call(http, router.url, "whoami", session=sid)
        assert status == 200
        assert headers["X-Kubeforge-Session-Moved-From"] == sid
        new_id = headers["X-Kubeforge-Session"]
        home = pid_of[body["result"]["pid"]]
        new_homes.append(home)
        # Old and new ids now stick to the same new replica.
        for s in (sid, new_id, sid):
            assert (
                pid_of[(await call(http, router.url, "whoami", session=s))[1]["result"]["pid"]]
                == home
            )
    assert set(new_homes) == {"replica-0", "replica-2"}, new_homes  # spread, not piled up

    # Sessions on the survivors never moved.
    for sid in sessions:
        if sid not in doomed:
            _, body, headers = await call(http, router.url, "whoami", session=sid)
            assert pid_of[body["result"]["pid"]] == holder[sid]
            assert "X-Kubeforge-Session-Moved-From" not in headers

    status, text = http_get(router.url + "/metrics")
    moved = re.search(r"^kubeforge_router_sessions_moved_total (\S+)$", text, re.M)
    assert moved and float(moved.group(1)) == 4.0
    assert router.log_text().count("moved from replica replica-1") == 4
    summary = http_get(router.url + "/v1/metrics/summary")[1]
    assert summary["service"]["healthy_replicas"] == 2
    assert summary["service"]["sessions_moved"] == 4


async def _on_which_replica(router_url: str) -> str:
    """The replica holding this router's one call in flight."""
    for _ in range(200):
        busy = [r["name"] for r in http_get(router_url + "/v1/replicas")[1] if r["in_flight"]]
        if busy:
            return busy[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the call never showed up in flight")


async def test_sessionless_call_cut_short_by_kill9_runs_again_unless_at_most_once(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.slow:Slow", 3)
    router = procs.router(replicas, "--health-poll-rate", f"{POLL}")
    by_name = {f"replica-{i}": r for i, r in enumerate(replicas)}

    for delivery, expect in (({}, 200), ({"X-Kubeforge-Delivery": "at-most-once"}, 502)):
        pending = asyncio.create_task(call(http, router.url, "work", 1.0, headers=delivery))
        victim = await _on_which_replica(router.url)
        by_name.pop(victim).kill9()
        status, body, _ = await pending
        assert status == expect, (delivery, body)
        if expect == 200:
            assert body["result"] == 1.0  # it ran to the end on a survivor
        else:
            assert body["error"]["type"] == "ReplicaLostError"
            assert victim in body["error"]["message"]
