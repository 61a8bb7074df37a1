"""Streaming endpoints (generators) end to end, in two deployments: a local `Service` (its
in-process router engine) and `ServiceClient` through a router process with two replica
processes. The tier runs twice, with the native relay and with the Python call path; the
native relay hands every stream to the router's Python server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import torch

from examples.tensors import Completion, Tensors
from examples.tokens import Tokens
from kubeforge import (
    BadRequestError,
    KubeforgeError,
    RemoteError,
    ReplicaLostError,
    RequestTimeoutError,
    Service,
    ServiceClient,
    ServiceConfig,
)
from kubeforge.local import LocalDeployment
from kubeforge.service_api import ServiceAPI
from tests.integration.procs import deployed

pytestmark = pytest.mark.timeout(120)
IDLE = 1.0  # the replicas' stream idle timeout here
TIMEOUT = 4.0  # and their request timeout, which bounds a whole stream
# A caller that leaves: its generator is closed on the replica within this (measured: ~0.05 s
# locally, ~0.1 s through a router).
CANCEL_BOUND = 1.0


@pytest.fixture(scope="module")
def routed() -> Iterator[LocalDeployment]:
    limits = ["--stream-idle-timeout", f"{IDLE}s", "--request-timeout", f"{TIMEOUT}s"]
    with deployed("examples.tokens:Tokens", 2, *limits) as dep:
        yield dep


@pytest.fixture(params=["local", "router"])
async def svc(request: pytest.FixtureRequest) -> AsyncIterator[ServiceAPI]:
    if request.param == "local":
        cfg = ServiceConfig(num_replicas=2, stream_idle_timeout=IDLE, request_timeout=TIMEOUT)
        async with Service(cfg, Tokens) as local:
            yield local
    else:
        dep: LocalDeployment = request.getfixturevalue("routed")
        async with ServiceClient(dep.url) as client:
            yield client


async def test_items_arrive_in_order_as_they_are_yielded(svc: ServiceAPI) -> None:
    assert [t async for t in svc.generate.stream("hi", n=4)] == [f"hi-{i}" for i in range(4)]
    assert [i async for i in svc.count.stream(5)] == [0, 1, 2, 3, 4]  # a sync generator
    assert [i async for i in svc.count.stream(0)] == []  # an empty stream ends cleanly
    started = time.monotonic()
    arrivals = [time.monotonic() - started async for _ in svc.generate.stream("x", 3, 0.3)]
    # Each item as it is yielded, not all at the end: 0.3 s apart.
    assert arrivals[0] < 0.55 and arrivals[2] > 0.85, arrivals
    assert arrivals[1] - arrivals[0] > 0.2, arrivals


async def test_an_error_mid_stream_reaches_the_caller_after_the_items_sent(
    svc: ServiceAPI,
) -> None:
    got = []
    with pytest.raises(RemoteError) as err:
        async for item in svc.fail_after.stream(2):
            got.append(item)
    assert got == [0, 1]
    assert err.value.remote_type == "ValueError" and "failed after 2 items" in str(err.value)
    with pytest.raises(RemoteError, match="failed after 0 items"):  # before any item: as a call
        async for _ in svc.fail_after.stream(0):
            pass


async def test_the_wrong_verb_is_a_400_that_names_the_right_one(
    svc: ServiceAPI, routed: LocalDeployment
) -> None:
    with pytest.raises(BadRequestError, match=r"does not stream.*POST /v1/call/plain"):
        async for _ in svc.plain.stream(1):
            pass
    with pytest.raises(BadRequestError, match=r"streams.*POST /v1/stream/generate"):
        await svc.generate.route("x")
    async with aiohttp.ClientSession() as http:
        for path, hint in [("/v1/stream/plain", "/v1/call/plain"), ("/v1/call/count", "stream")]:
            async with http.post(routed.url + path, json={"args": [1]}) as resp:
                assert resp.status == 400, path
                assert hint in (await resp.json())["error"]["message"]


async def test_a_caller_that_leaves_cancels_the_generator_on_its_replica(
    svc: ServiceAPI,
) -> None:
    before = sum(len(c) for c in await svc.closed_streams.fanout())
    stream = svc.watched.stream(10_000, 0.01)
    async for item in stream:
        if item["i"] == 3:
            break
    left = time.time()
    await stream.aclose()
    deadline = time.monotonic() + 5
    while (closed := [c for cs in await svc.closed_streams.fanout() for c in cs])[before:] == []:
        assert time.monotonic() < deadline, "the generator was never closed"
        await asyncio.sleep(0.02)
    record = closed[-1]
    assert record["how"] in ("CancelledError", "GeneratorExit")
    took = record["at"] - left
    assert took < CANCEL_BOUND, took
    print(f"caller left: the generator saw {record['how']} {max(took, 0) * 1e3:.0f} ms later")
    produced = (await svc.stats.fanout())[0]["produced"]
    await asyncio.sleep(0.3)
    assert (await svc.stats.fanout())[0]["produced"] == produced  # and yields no more


async def test_an_open_stream_counts_as_load_on_its_replica(svc: ServiceAPI) -> None:
    """Least-loaded placement sees a stream until its last item: calls go to the other replica
    while one replica streams: at once in the router engine (the local Service's), and through
    a router process after a health poll (the native relay learns the Python path's load with
    the routing table, pushed after every poll)."""
    stream = svc.watched.stream(10_000, 0.02)
    try:
        streaming_pid = (await anext(stream))["pid"]
        if isinstance(svc, ServiceClient):
            await asyncio.sleep(0.5)  # a health poll (0.2 s) and a push
        for _ in range(5):
            assert (await svc.stats.route())["pid"] != streaming_pid
    finally:
        await stream.aclose()


async def test_a_stream_in_a_session_sticks_to_its_replica(svc: ServiceAPI) -> None:
    async with svc.session() as sid:
        pids = set()
        for _ in range(3):
            async for item in svc.watched.stream(4, 0.0):
                assert item["session"] == sid  # current_session() inside the generator
                pids.add(item["pid"])
        assert len(pids) == 1


async def test_a_slow_reader_slows_the_generator(svc: ServiceAPI) -> None:
    """Backpressure: 1 MiB items read slowly; the generator runs only a bounded distance
    ahead (socket buffers and the streams' few MiB), not to the end."""
    before = sum(s["produced"] for s in await svc.stats.fanout())
    read = 0
    stream = svc.blobs.stream(400, 1 << 20)
    async for blob in stream:
        assert len(blob) == 1 << 20 and blob[0] == read % 256
        read += 1
        await asyncio.sleep(0.02)
        if read == 30:
            break
    ahead = sum(s["produced"] for s in await svc.stats.fanout()) - before - read
    await stream.aclose()
    assert ahead < 120, ahead  # unpaced, all 400 would be made at once
    print(f"a slow reader of 1 MiB items: the generator ran {ahead} items ahead")


async def test_timeouts_bound_the_gap_between_items_and_the_whole_stream(
    svc: ServiceAPI,
) -> None:
    got = []
    with pytest.raises(RequestTimeoutError, match=f"no item for {IDLE:g}s after item 2"):
        async for item in svc.paced.stream([0, 0, IDLE * 2]):
            got.append(item)
    assert got == [0, 1]
    got.clear()
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=f"did not finish its stream within {TIMEOUT:g}s"):
        async for item in svc.paced.stream([IDLE / 2] * 20):  # every gap within the idle bound
            got.append(item)
    took = time.monotonic() - started
    assert TIMEOUT - 0.1 < took < TIMEOUT + 1.0, took
    assert 4 <= len(got) <= 8, got


async def test_server_sent_events_for_curl_and_browsers(routed: LocalDeployment) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            routed.url + "/v1/stream/generate",
            json={"args": ["hello"], "kwargs": {"n": 3}},
            headers={"Accept": "text/event-stream"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"] == "text/event-stream"
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[:3] == [f'data: "hello-{i}"' for i in range(3)]
    assert events[3] == "event: end\ndata: {}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            routed.url + "/v1/stream/fail_after",
            json={"args": [1]},
            headers={"Accept": "text/event-stream"},
        ) as resp,
    ):
        events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    assert events[0] == "data: 0"
    kind, data = events[1].split("\n")
    assert kind == "event: error"
    assert json.loads(data.removeprefix("data: "))["error"]["type"] == "ValueError"


async def test_tensors_and_dataclasses_stream_as_they_were_sent() -> None:
    async with Service(ServiceConfig(num_replicas=1), Tensors) as svc:
        prompt = torch.arange(6, dtype=torch.int64)
        steps: list[Any] = [c async for c in svc.rollout.stream(prompt, 3)]
    assert [type(c) for c in steps] == [Completion] * 3
    for i, c in enumerate(steps):
        assert torch.equal(c.prompt_ids, prompt) and torch.equal(c.token_ids, prompt + i)
        assert c.logprobs.dtype == torch.float32 and c.text == f"step {i}"


async def test_service_and_actor_handles_stream() -> None:
    policy = await Tokens.as_service()
    actor = await Tokens.as_actor()
    try:
        assert [t async for t in policy.generate.stream("p", 2)] == ["p-0", "p-1"]
        assert [t async for t in actor.generate.stream("a", 2)] == ["a-0", "a-1"]
    finally:
        await policy.shutdown()
        await actor.shutdown()


async def test_fanout_stream_yields_each_replica_as_it_answers(svc: ServiceAPI) -> None:
    async with svc.session():
        await svc.mark.route()  # this replica naps; the other answers at once
    try:
        started = time.monotonic()
        got = []
        async for answer in svc.nap.fanout_stream(0.6):
            got.append((time.monotonic() - started, answer))
        assert len(got) == 2
        (fast_at, fast), (slow_at, slow) = got
        assert fast_at < 0.4 < 0.55 < slow_at, got  # the quick one did not wait for the other
        assert fast.error is None and slow.error is None
        assert {fast.replica, slow.replica} == {"replica-0", "replica-1"}
        assert fast.result != slow.result  # each replica's own answer (its pid)
        assert sorted([fast.value(), slow.value()]) == sorted(await svc.nap.fanout(0.0))
        async for answer in svc.fail_after.fanout_stream(1):  # a generator: the wrong verb
            assert answer.error is not None and "POST /v1/stream/fail_after" in str(answer.error)
            with pytest.raises(BadRequestError):
                answer.value()
    finally:
        await svc.mark.fanout(False)


async def test_a_replica_lost_mid_stream_raises_replica_lost_and_is_not_sent_again(
    routed: LocalDeployment,
) -> None:
    async with ServiceClient(routed.url) as client:
        before = await client.stats.fanout()
        got = []
        with pytest.raises(ReplicaLostError, match="cut after 5 items"):
            async for item in client.watched.stream(10_000, 0.02):
                got.append(item)
                if len(got) == 5:
                    os.kill(item["pid"], signal.SIGKILL)
        assert [g["i"] for g in got] == [0, 1, 2, 3, 4]
        # Not sent again: the other replica made no item of it. (This deployment does not
        # restart a killed replica: the test module's last use of it.)
        victim = got[0]["pid"]
        survivor = next(s for s in before if s["pid"] != victim)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(KubeforgeError):
                after = await client.stats.fanout()
                if [s["pid"] for s in after] == [survivor["pid"]]:
                    break
            assert time.monotonic() < deadline, "the killed replica is still in rotation"
            await asyncio.sleep(0.1)
        assert after == [survivor], (before, after)
