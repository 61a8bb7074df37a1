"""Large bodies stream through the router process: it never holds one whole (issue 21, point
3). Measured as the router's peak RSS growth (VmHWM) during the call, on both call paths (the
tier runs again with KUBEFORGE_RELAY=python; with the native relay such a call is handed to
the Python call path, which pipes it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from examples.tensors import Tensors
from kubeforge import ServiceClient, contract
from kubeforge.errors import PayloadTooLargeError, RequestTimeoutError
from kubeforge.http.stream import WRITER_THREAD
from kubeforge.local import LocalDeployment, ReplicaSet, free_port

pytestmark = pytest.mark.timeout(240)

MiB = 1 << 20
ROUTER_GROWTH_LIMIT = 64 * MiB  # the bound for a 1 GiB call


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current RSS


@pytest.fixture(scope="module")
def deployment() -> Iterator[LocalDeployment]:
    dep = LocalDeployment(
        ReplicaSet(
            actor="examples.tensors:Tensors",
            replicas=2,
            flags=["--max-body", str(512 * MiB)],
        ),
        port=free_port(),
        router_flags=["--max-body", str(512 * MiB)],
    )
    dep.start(progress=lambda _m: None)
    try:
        yield dep
    finally:
        dep.stop()


async def test_a_256_mib_call_streams_through_the_router(deployment: LocalDeployment) -> None:
    router = deployment.router.pids[0]
    t = torch.randn(64 * MiB)  # 256 MiB of float32, sent and sent back
    assert t.nbytes > contract.STREAM_BODY
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        await client.echo(None, torch.ones(4))  # connections and code warm
        reset_peak(router)
        before = peak_rss(router)
        out = await client.echo(None, t)
        growth = peak_rss(router) - before
        assert torch.equal(out, t)
        assert growth < ROUTER_GROWTH_LIMIT, f"router peak RSS grew {growth / MiB:.0f} MiB"
        # The connection is fine afterwards: small calls still go through, and large ones
        # stream both ways on it again.
        assert torch.equal(await client.echo(None, torch.arange(3)), torch.arange(3))
        for _ in range(2):
            assert torch.equal(await client.echo(None, t[: 8 * MiB]), t[: 8 * MiB])


async def test_a_large_broadcast_is_uploaded_once_and_streams_to_every_replica(
    deployment: LocalDeployment,
) -> None:
    router = deployment.router.pids[0]
    state = {"w": torch.ones(32 * MiB)}  # 128 MiB, to both replicas at once
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        await client.nbytes.fanout(torch.ones(4))
        reset_peak(router)
        before = peak_rss(router)
        sums = await client.checksum.fanout(state)
        growth = peak_rss(router) - before
        assert sums == [float(32 * MiB)] * 2
        assert growth < ROUTER_GROWTH_LIMIT, f"router peak RSS grew {growth / MiB:.0f} MiB"


async def test_concurrent_large_calls_each_arrive_whole(deployment: LocalDeployment) -> None:
    tensors = [torch.full((8 * MiB,), float(i)) for i in range(3)]  # 32 MiB each
    async with ServiceClient(deployment.url, actor=Tensors, timeout=120) as client:
        sums = await asyncio.gather(*(client.checksum(None, {"t": t}) for t in tensors))
    assert sums == [float(i * 8 * MiB) for i in range(3)]


async def test_a_body_past_max_body_is_refused_before_it_is_read(
    deployment: LocalDeployment,
) -> None:
    async with ServiceClient(deployment.url, actor=Tensors, timeout=60) as client:
        with pytest.raises(PayloadTooLargeError, match="exceeds"):
            await client.echo(None, torch.ones(160 * MiB))  # 640 MiB > 512 MiB
        assert await client.nbytes(None, torch.ones(10)) == 40


# The router's streamed-body machinery, from the socket: chunks read straight from the
# connection must stop where the body does, and each connection's writer thread must end with
# its body, however that body ends.


def writer_threads(pid: int) -> int:
    tasks = Path(f"/proc/{pid}/task")
    return sum((t / "comm").read_text().strip() == WRITER_THREAD for t in tasks.iterdir())


async def no_writer_threads(pid: int, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while (n := writer_threads(pid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return n


def call_request(endpoint: str, body: bytes, host: str) -> bytes:
    return (
        f"POST /v1/call/{endpoint} HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def test_a_request_pipelined_after_a_streamed_body_is_answered_too(
    deployment: LocalDeployment,
) -> None:
    text = "ab" * (10 * MiB)  # a 20 MiB JSON body streams in, and its echo streams out
    big = json.dumps({"args": [text]}).encode()
    assert len(big) > contract.STREAM_BODY
    host, port = deployment.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=64 * MiB)
    try:
        # One write: the small call's bytes follow the large body's in the same reads.
        writer.write(call_request("echo", big, host) + call_request("echo", b'{"args": [7]}', host))
        first = await asyncio.wait_for(read_response(reader), 60)
        second = await asyncio.wait_for(read_response(reader), 60)
    finally:
        writer.close()
    assert first[0] == 200 and json.loads(first[1]) == {"result": text}
    assert second == (200, b'{"result":7}') or json.loads(second[1]) == {"result": 7}
    assert await no_writer_threads(deployment.router.pids[0]) == 0


async def test_a_caller_gone_mid_body_leaves_no_writer_and_the_router_serves_on(
    deployment: LocalDeployment,
) -> None:
    router = deployment.router.pids[0]
    host, port = deployment.url.removeprefix("http://").split(":")
    big = json.dumps({"args": ["c" * (64 * MiB)]}).encode()
    _reader, writer = await asyncio.open_connection(host, int(port))
    request = call_request("echo", big, host)
    writer.write(request[: len(request) // 2])
    await writer.drain()
    deadline = time.monotonic() + 10
    while not writer_threads(router) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert writer_threads(router), "the half-sent body was not being written on"
    writer.transport.abort()  # the caller goes away with half its body sent
    assert await no_writer_threads(router) == 0
    async with ServiceClient(deployment.url, actor=Tensors, timeout=60) as client:
        # The caller's doing: its replica stays in rotation.
        assert {r["state"] for r in await client.replicas()} == {"HEALTHY"}
        assert await client.nbytes(None, torch.ones(8 * MiB)) == 32 * MiB
        assert await client.nbytes.fanout(torch.ones(8 * MiB)) == [32 * MiB] * 2


async def test_a_replica_that_stops_reading_fails_the_call_at_its_deadline() -> None:
    dep = LocalDeployment(
        ReplicaSet(actor="examples.tensors:Tensors", replicas=1),
        port=free_port(),
        router_flags=["--max-body", str(512 * MiB), "--request-timeout", "3s"],
    )
    dep.start(progress=lambda _m: None)
    replica, router = dep.replica_set.procs.pids[0], dep.router.pids[0]
    try:
        async with ServiceClient(dep.url, actor=Tensors, timeout=60) as client:
            await client.nbytes(None, torch.ones(4))
            os.kill(replica, signal.SIGSTOP)  # alive, connected, and reading nothing
            try:
                started = time.monotonic()
                with pytest.raises(RequestTimeoutError):
                    await client.nbytes(None, torch.ones(64 * MiB))  # 256 MiB: it stalls
                took = time.monotonic() - started
                assert took < 3 + 5, f"the stalled call took {took:.1f} s against a 3 s limit"
                assert await no_writer_threads(router) == 0
            finally:
                os.kill(replica, signal.SIGCONT)
    finally:
        dep.stop()
