"""`ServiceClient` given several routers: a request that cannot reach one goes to the next, as
the one retry rule allows. A real router (`kubeforge run`), a closed port, and a listener that
takes a request and drops the connection, as a router killed mid-call does."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from kubeforge import NoHealthyReplicasError, ServiceClient
from tests.integration.procs import free_port
from tests.integration.test_cli import start_run


@pytest.fixture
async def router() -> AsyncIterator[str]:
    port = free_port()
    proc, out = await asyncio.to_thread(start_run, "examples/counter.yaml", port)
    try:
        assert "is serving" in out, out
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 15)


@pytest.fixture
async def dropper() -> AsyncIterator[str]:
    """Reads a request head, then closes the connection without an answer."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_a_router_that_refuses_is_passed_over_for_the_next(router: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with ServiceClient([closed, router]) as client:
        sid = await client.start_session()
        assert [await client.incr(sid, 1) for _ in range(3)] == [1, 2, 3]
        assert client.url == router  # the one that refused went to the back
        assert len({(await client.whoami(None))["replica"] for _ in range(6)}) == 3


async def test_no_router_reachable_names_every_one_tried() -> None:
    closed = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with ServiceClient(closed) as client:
        with pytest.raises(NoHealthyReplicasError) as err:
            await client.whoami(None)
    assert all(url in str(err.value) for url in closed)


async def test_a_call_cut_short_is_sent_again_only_without_a_session(
    router: str, dropper: str
) -> None:
    """A call without a session goes on to the next router; one in a session may have run, so
    the caller hears of it (retry.decide: a lost call in a session is not re-sent)."""
    async with ServiceClient(router) as direct:
        sid = await direct.start_session()
        await direct.incr(sid, 1)
    async with ServiceClient([dropper, router]) as client:
        with pytest.raises(NoHealthyReplicasError, match="cannot reach the router at"):
            await client.incr(sid, 1)
        assert client.url == router  # the router that failed went to the back
        assert await client.incr(sid, 1) == 2  # the lost call never reached the replica
    async with ServiceClient([dropper, router]) as client:
        assert (await client.whoami(None))["replica"]  # re-sent to the live router


def test_a_client_needs_a_router() -> None:
    with pytest.raises(ValueError, match="at least one router URL"):
        ServiceClient([])
