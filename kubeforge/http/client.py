"""Client side: pooled keep-alive connections to one upstream (a replica).

The error classes say how far a request got, which is what decides whether the router may
retry it elsewhere: `ConnectFailed` never reached the peer; `ConnectionLost` may have.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """The connection could not be opened: the request was never sent."""


class ConnectionLost(UpstreamError):
    """The connection broke after the request was written, before the response was complete."""


class UpstreamTimeout(UpstreamError):
    pass


class ClientResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[ClientResponse] | None = None
        self.closed = False
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionLost(str(exc or "connection closed by peer")))
        self.waiter = None

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionLost(f"malformed response: {exc}"))
            self.abort()

    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        resp = ClientResponse(self.parser.get_status_code(), self._headers, body)
        if not self.parser.should_keep_alive():
            self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A pool of keep-alive connections to one `host:port`."""

    def __init__(self, host: str, port: int, max_idle: int = 256) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle: deque[_Connection] = deque()
        self.host_header = f"{host}:{port}".encode()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    async def request(
        self,
        method: bytes,
        path: bytes,
        headers: bytes,
        body: bytes,
        timeout: float,
    ) -> ClientResponse:
        """Send one request; `headers` are pre-rendered `name: value\\r\\n` lines."""
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            conn = await asyncio.wait_for(self._connect(), timeout)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ClientResponse] = loop.create_future()
        conn.waiter = waiter
        conn.transport.write(  # type: ignore[union-attr]
            b"".join(
                (
                    method,
                    b" ",
                    path,
                    b" HTTP/1.1\r\nhost: ",
                    self.host_header,
                    b"\r\ncontent-length: ",
                    str(len(body)).encode(),
                    b"\r\n",
                    headers,
                    b"\r\n",
                    body,
                )
            )
        )
        timer = loop.call_later(timeout, _expire, conn, waiter, timeout)
        try:
            resp = await waiter
        except asyncio.CancelledError:
            conn.abort()  # the response would arrive on a connection nobody waits on
            raise
        finally:
            timer.cancel()
        if not conn.closed and len(self.idle) < self.max_idle:
            self.idle.append(conn)
        return resp

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()


def _expire(conn: _Connection, waiter: asyncio.Future[ClientResponse], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"no response within {timeout:g}s"))
    conn.abort()
