"""A connection's handlers run one after another in one task of the connection's (not a task
made per request), yet each behaves as if it had a task of its own: its own contextvars, a
current task in its first step, deadlines that cancel only it. Real server, real sockets on
loopback."""

from __future__ import annotations

import asyncio
import contextvars
import json

import pytest

from kubeforge.http.server import HttpServer, Request, Response

pytestmark = pytest.mark.timeout(30)

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("SEEN", default="unset")


async def _handler(req: Request) -> Response:
    """`/mark`: reports the contextvar as it found it, then sets it (and never resets it).
    `/deadline`: a deadline that expires in the handler's own first await.
    `/task`: which task runs it."""
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
    if req.path == "/task":
        return Response(200, json.dumps({"task": id(asyncio.current_task())}).encode())
    return Response(404, b"{}")


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paths: list[str]
) -> list[dict[str, object]]:
    """Send every request at once (pipelined), then read their answers in order."""
    writer.write(b"".join(f"GET {p} HTTP/1.1\r\nhost: kf\r\n\r\n".encode() for p in paths))
    await writer.drain()
    out = []
    for _ in paths:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append(json.loads(await reader.readexactly(length)))
    return out


async def test_each_request_sees_its_own_contextvars_on_a_shared_connection() -> None:
    server = HttpServer(_handler, max_body=1 << 20)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = await _exchange(reader, writer, ["/mark?a", "/mark?b", "/mark?c"])
        # One after another, none sees what the one before it set.
        assert [a["found"] for a in answers] == ["unset"] * 3
        answers = await _exchange(reader, writer, ["/mark?d"])
        assert answers == [{"found": "unset"}]
        writer.close()
    finally:
        await server.close()


async def test_a_deadline_in_a_handler_cancels_that_handler_only() -> None:
    server = HttpServer(_handler, max_body=1 << 20)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = await _exchange(reader, writer, ["/deadline", "/mark?x", "/deadline"])
        assert answers == [{"timed_out": True}, {"found": "unset"}, {"timed_out": True}]
        writer.close()
    finally:
        await server.close()


async def test_one_task_per_connection_and_it_ends_with_the_connection() -> None:
    server = HttpServer(_handler, max_body=1 << 20)
    port = await server.start("127.0.0.1", 0)
    before = len(asyncio.all_tasks())
    try:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        tasks = [await _exchange(r, w, ["/task", "/task", "/task"]) for r, w in conns]
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
    finally:
        await server.close()
