"""A connection's handlers run one after another as one task of the connection's (not a task
made per request), yet each behaves as if it had a task of its own: its own contextvars, a
current task in its first step, deadlines that cancel only it. A request that arrives while
that task is idle has its handler's first step run right after the loop's reads, as the task,
which takes over only if the handler waits; pipelined requests start inside the task. Both
ways are tested. Real server, real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kubeforge.http.server import HttpServer, Request, Response

pytestmark = pytest.mark.timeout(30)

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("SEEN", default="unset")


async def _handler(req: Request) -> Response:
    """`/mark`: reports the contextvar as it found it, then sets it (and never resets it).
    `/deadline`: a deadline that expires in the handler's own first await.
    `/expired`: a deadline already past when its first step sets it.
    `/task`: which task runs it, before and after it waits.
    `/cancelled`: awaits a future that something else cancels."""
    if req.path == "/mark":
        found = SEEN.get()
        SEEN.set(req.query)
        return Response(200, json.dumps({"found": found}).encode())
    if req.path == "/deadline":
        try:
            async with asyncio.timeout(0.01):  # needs a current task in the first step
                await asyncio.sleep(5)
        except TimeoutError:
            return Response(200, b'{"timed_out": true}')
        return Response(500, b'{"timed_out": false}')
    if req.path == "/expired":
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(5)
        except TimeoutError:
            return Response(200, b'{"timed_out": true}')
        return Response(500, b'{"timed_out": false}')
    if req.path == "/cancelled":
        waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(waited.cancel)
        await waited
    if req.path == "/task":
        first = asyncio.current_task()
        await asyncio.sleep(0)
        then = asyncio.current_task()
        assert first is then, (first, then)
        return Response(200, json.dumps({"task": id(first)}).encode())
    return Response(404, b"{}")


async def _read_answer(reader: asyncio.StreamReader) -> dict[str, object]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    answer = json.loads(await reader.readexactly(length))
    return {**answer, "status": int(head.split()[1])}


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: kf\r\n\r\n".encode()


async def _pipelined(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paths: list[str]
) -> list[dict[str, object]]:
    """Send every request at once, then read their answers in order."""
    writer.write(b"".join(_request(p) for p in paths))
    await writer.drain()
    return [await _read_answer(reader) for _ in paths]


async def _one_by_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paths: list[str]
) -> list[dict[str, object]]:
    """Each request once the one before it is answered (the connection's task idle)."""
    out = []
    for path in paths:
        writer.write(_request(path))
        await writer.drain()
        out.append(await _read_answer(reader))
    return out


@pytest.fixture
async def port() -> AsyncIterator[int]:
    """A server of `_handler` on loopback: its port."""
    server = HttpServer(_handler, max_body=1 << 20)
    try:
        yield await server.start("127.0.0.1", 0)
    finally:
        await server.close()


WAYS = pytest.mark.parametrize(
    "exchange", [_pipelined, _one_by_one], ids=["pipelined", "one_by_one"]
)


@WAYS
async def test_each_request_sees_its_own_contextvars_on_a_shared_connection(
    exchange: Any, port: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = await exchange(reader, writer, ["/mark?a", "/mark?b", "/mark?c"])
    # One after another, none sees what the one before it set.
    assert [a["found"] for a in answers] == ["unset"] * 3
    answers = await exchange(reader, writer, ["/mark?d"])
    assert answers == [{"found": "unset", "status": 200}]
    writer.close()


@WAYS
async def test_a_deadline_in_a_handler_cancels_that_handler_only(exchange: Any, port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    paths = ["/deadline", "/mark?x", "/expired", "/deadline", "/expired", "/mark?y"]
    answers = await exchange(reader, writer, paths)
    timed_out, unset = {"timed_out": True, "status": 200}, {"found": "unset", "status": 200}
    assert answers == [timed_out, unset, timed_out, timed_out, timed_out, unset]
    writer.close()


@WAYS
async def test_a_handler_whose_await_is_cancelled_gets_a_500_and_the_connection_goes_on(
    exchange: Any, port: int
) -> None:
    """With a task per request, such a request went unanswered; the connection's task must
    neither end with it nor leave the requests after it waiting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = await exchange(reader, writer, ["/cancelled", "/mark?z", "/cancelled", "/mark?w"])
    assert [a["status"] for a in answers] == [500, 200, 500, 200]
    assert "CancelledError" in str(answers[0]["error"])
    writer.close()


@WAYS
async def test_one_task_per_connection_and_it_ends_with_the_connection(
    exchange: Any, port: int
) -> None:
    before = len(asyncio.all_tasks())
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    tasks = [await exchange(r, w, ["/task", "/task", "/task"]) for r, w in conns]
    first, second = ({a["task"] for a in answers} for answers in tasks)
    assert len(first) == 1 and len(second) == 1 and first != second
    assert len(asyncio.all_tasks()) == before + 2  # one per connection, idle now
    for _, w in conns:
        w.close()
        await w.wait_closed()
    for _ in range(100):
        if len(asyncio.all_tasks()) == before:
            break
        await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == before
