"""Session affinity, spreading, ending and expiry on real replica and router processes."""

import asyncio
import json

import aiohttp

from kubeforge import Actor, Service, ServiceConfig, contract, current_session, endpoint
from tests.integration.conftest import call, start_session
from tests.integration.procs import Procs, http_get


async def test_ten_calls_in_a_session_hit_one_replica(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.counter:Counter", 3))
    sid = await start_session(http, router.url)
    results = [(await call(http, router.url, "incr", session=sid))[1]["result"] for _ in range(10)]
    assert results == list(range(1, 11))  # one counter, counting up by one each call
    pids = {
        (await call(http, router.url, "whoami", session=sid))[1]["result"]["pid"] for _ in range(5)
    }
    assert len(pids) == 1


async def test_thirty_idle_sessions_spread_within_one(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    router = procs.router(replicas)
    await asyncio.gather(*(start_session(http, router.url) for _ in range(30)))
    # Ask the replicas themselves: they hold the registered sessions.
    counts = [http_get(r.url + "/healthz")[1]["sessions"] for r in replicas]
    assert sum(counts) == 30
    assert max(counts) - min(counts) <= 1, counts


async def test_terminate_reaches_on_session_end_on_the_holding_replica(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.counter:Counter", 3))
    sid = await start_session(http, router.url)
    holder = (await call(http, router.url, "whoami", session=sid))[1]["result"]["replica"]
    async with http.delete(f"{router.url}/v1/sessions/{sid}") as resp:
        assert resp.status == 200
    async with http.post(f"{router.url}/v1/call_all/ended", json={}) as resp:
        body = await resp.json()
    ended = dict(zip(body["replicas"], body["results"], strict=True))
    assert [name for name, sids in ended.items() if sid in sids] == [f"replica-{holder[1:]}"]
    # A call in an ended session is a clear 4xx, not a silent new session.
    status, body, _ = await call(http, router.url, "incr", session=sid)
    assert status == 404 and "ended" in body["error"]["message"]


async def test_idle_sessions_expire_and_the_actor_is_told(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica("examples.counter:Counter", "--session-ttl", "300ms")
    router = procs.router([replica])
    sid = await start_session(http, router.url)
    await call(http, router.url, "incr", session=sid)
    await asyncio.sleep(1.0)
    status, body, _ = await call(http, router.url, "ended")
    assert sid in body["result"]
    status, body, _ = await call(http, router.url, "incr", session=sid)
    assert status == 404 and "idle" in body["error"]["message"]


async def test_two_routers_and_a_restarted_router_agree_on_a_session(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    a = procs.router(replicas)
    b = procs.router(replicas)
    sid = await start_session(http, a.url)
    seen = []
    for i in range(6):
        base = (a, b)[i % 2].url
        seen.append((await call(http, base, "incr", session=sid))[1]["result"])
    assert seen == [1, 2, 3, 4, 5, 6]
    a.kill9()
    a2 = procs.router(replicas, port=a.port)  # a fresh process: it knows nothing of the session
    async with aiohttp.ClientSession() as fresh:  # the old pooled connections died with `a`
        assert (await call(fresh, a2.url, "incr", session=sid))[1]["result"] == 7


async def test_unknown_session_ids_are_rejected(procs: Procs, http: aiohttp.ClientSession) -> None:
    """An id in the issued form whose MAC is wrong is a forgery or a typo, not a name: refused.
    Ending a name that no replica holds is refused too."""
    router = procs.router(procs.replicas("examples.counter:Counter", 1))
    forged = "0.abc.0123456789ab.0123456789abcdef"
    status, body, _ = await call(http, router.url, "incr", session=forged)
    assert status == 404 and body["error"]["type"] == "UnknownSessionError"
    async with http.delete(f"{router.url}/v1/sessions/garbage") as resp:
        assert resp.status == 404
        assert json.loads(await resp.text())["error"]["type"] == "UnknownSessionError"


# Sessions the caller names (torchforge's `sess_id="sess1"`): placed on first use, then sticky.


async def holder_of(http: aiohttp.ClientSession, base: str, name: str) -> str:
    return (await call(http, base, "whoami", session=name))[1]["result"]["replica"]


async def test_a_name_is_placed_on_first_use_on_the_least_loaded_replica_and_sticks(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    router = procs.router(replicas)
    names = [f"episode/{i} of run 7%" for i in range(30)]  # `/`, spaces and `%` are fine
    first = [await holder_of(http, router.url, n) for n in names]  # no call in flight meanwhile
    counts = [http_get(r.url + "/healthz")[1]["sessions"] for r in replicas]
    assert sum(counts) == 30 and max(counts) - min(counts) <= 1, counts
    for _ in range(3):
        again = await asyncio.gather(*(holder_of(http, router.url, n) for n in names))
        assert again == first


async def test_two_routers_and_a_restarted_router_agree_on_a_name(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replicas = procs.replicas("examples.counter:Counter", 3)
    a, b = procs.router(replicas), procs.router(replicas)
    where = {await holder_of(http, (a, b)[i % 2].url, "sess1") for i in range(6)}
    assert len(where) == 1, where  # b asked the replicas where a had placed it
    a.kill9()
    a2 = procs.router(replicas, port=a.port)  # knows nothing of the name
    async with aiohttp.ClientSession() as fresh:
        assert await holder_of(fresh, a2.url, "sess1") in where


async def test_terminating_a_name_reaches_on_session_end_and_the_name_starts_afresh(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.counter:Counter", 2))
    holder = await holder_of(http, router.url, "sess1")
    async with http.delete(f"{router.url}/v1/sessions/sess1") as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{router.url}/v1/call_all/ended", json={}) as resp:
        body = await resp.json()
    ended = dict(zip(body["replicas"], body["results"], strict=True))
    assert [name for name, sids in ended.items() if "sess1" in sids] == [f"replica-{holder[1:]}"]
    status, _, headers = await call(http, router.url, "incr", session="sess1")
    assert status == 200 and contract.H_SESSION_MOVED_FROM.decode() not in headers
    async with http.delete(f"{router.url}/v1/sessions/never-used") as resp:
        assert resp.status == 404  # nothing to end


async def test_a_name_that_idled_out_starts_afresh_and_says_its_state_is_gone(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    replica = procs.replica("examples.counter:Counter", "--session-ttl", "300ms")
    router = procs.router([replica])
    assert (await call(http, router.url, "incr", session="sess1"))[0] == 200
    await asyncio.sleep(1.0)
    assert "sess1" in (await call(http, router.url, "ended"))[1]["result"]
    status, _, headers = await call(http, router.url, "incr", session="sess1")
    assert status == 200
    assert headers[contract.H_SESSION_MOVED_FROM.decode()] == "sess1"
    status, _body, _ = await call(
        http, router.url, "incr", session="sess1", headers={"X-Kubeforge-Session-Moved": "error"}
    )
    assert status == 200  # live again: nothing moved since


async def test_a_name_that_cannot_travel_is_a_clear_400(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    router = procs.router(procs.replicas("examples.counter:Counter", 1))
    for bad in ("x" * 257, "épisode"):
        status, body, _ = await call(http, router.url, "incr", session=bad)
        assert status == 400 and "session id" in body["error"]["message"], body


class SessionEcho(Actor):
    @endpoint
    async def whose(self) -> str | None:
        return current_session()

    @endpoint
    def whose_sync(self) -> str | None:  # on a worker thread
        return current_session()


async def test_an_endpoint_knows_the_session_of_its_call_on_every_rank() -> None:
    cfg = ServiceConfig(num_replicas=1, procs=2, return_first_rank_result=False)
    async with Service(cfg, SessionEcho) as svc:
        sid = await svc.start_session()
        assert await svc.whose(sid) == [sid, sid]
        assert await svc.whose_sync("episode-9") == ["episode-9", "episode-9"]
        assert await svc.whose.route() == [None, None]
        assert await svc.whose_sync.route() == [None, None]
