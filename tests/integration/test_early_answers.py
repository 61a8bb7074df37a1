"""An answer that comes before its request's body has all arrived (a replica that stopped
reading, a deadline, a refusal decided from the head) reaches a caller still writing that body:
the server reads and drops the rest, marks the answer as the connection's last, and closes once
the caller is done. Real server, real sockets on loopback; the handlers play the router's part."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from kubeforge.http.server import HttpServer, Request, Response
from kubeforge.http.stream import BodyStream

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
BODY = 64 * MiB


async def _answers_unread(req: Request) -> Response:
    """Refuses from the head alone: not a byte of the body read."""
    assert isinstance(req.body, BodyStream)
    return Response(403, b'{"error": "refused from the head"}')


async def _gives_up(req: Request) -> Response:
    """Reads a little, then gives the body up (its reader went away), as the router does when
    the replica it writes to stops reading until the call's deadline."""
    assert isinstance(req.body, BodyStream)
    async for _chunk in req.body.chunks():
        break
    req.body.cancel("the replica stopped reading")
    await asyncio.sleep(0.2)  # the deadline passes while the caller goes on writing
    return Response(504, b'{"error": "deadline"}')


def _post_and_read(port: int) -> tuple[bytes, BaseException | None, bool]:
    """Send a large call from a thread while reading its answer here: (answer, what writing
    raised, whether the server then closed cleanly)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = b"POST /v1/call/x HTTP/1.1\r\nhost: kf\r\ncontent-length: %d\r\n\r\n" % BODY
    failed: list[BaseException] = []

    def write() -> None:
        try:
            sock.sendall(head)
            chunk = b"b" * MiB
            for _ in range(BODY // MiB):
                sock.sendall(chunk)
        except OSError as exc:
            failed.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            got = sock.recv(65536)
            if not got:
                break
            answer += got
        writer.join(20)
        sock.settimeout(5)
        closed = sock.recv(1) == b""  # EOF, not a reset, after the caller sent it all
    except OSError as exc:
        failed.append(exc)
        closed = False
    finally:
        sock.close()
        writer.join(5)
    return answer, failed[0] if failed else None, closed


@pytest.mark.parametrize(
    ("handler", "status"), [(_answers_unread, b"403"), (_gives_up, b"504")], ids=["unread", "gone"]
)
async def test_an_answer_before_the_body_ends_reaches_the_caller_still_writing_it(
    handler: Callable[[Request], Awaitable[Response]], status: bytes
) -> None:
    server = HttpServer(handler, max_body=BODY, stream_above=MiB)
    port = await server.start("127.0.0.1", 0)
    try:
        answer, failed, closed = await asyncio.to_thread(_post_and_read, port)
    finally:
        await server.close()
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert failed is None, f"the caller's body was cut off: {failed!r}"
    assert b"connection: close" in answer.lower(), answer[:200]
    assert closed, "the server did not close after the caller's body ended"
