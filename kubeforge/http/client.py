"""Client side: pooled keep-alive connections to one upstream (a replica).

The error classes say how far a request got, which is what decides whether the router may
retry it elsewhere: `ConnectFailed` never reached the peer; `ConnectionLost` may have.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from kubeforge.http.server import ONE_BUFFER, BodyBuffer, body_length, body_parts
from kubeforge.http.stream import BodyStream, StreamError, pipe, write_paced
from kubeforge.tls import ClientTls


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """The connection could not be opened: the request was never sent."""


class ConnectionLost(UpstreamError):
    """The connection broke after the request was written, before the response was complete."""


class UpstreamTimeout(UpstreamError):
    pass


class BodyAbandoned(UpstreamError):
    """The caller's streamed body stopped arriving while it was written on: the caller's doing,
    not the replica's."""


def _parse_headers(raw: bytes) -> dict[bytes, bytes]:
    head = raw[: raw.find(b"\r\n\r\n")].split(b"\r\n")[1:]
    pairs = (line.split(b":", 1) for line in head if b":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _announced_length(first: bytes) -> int:
    """The content-length in the head that starts `first` (0 when it says none)."""
    at = first.find(b"content-length:")
    if at < 0:
        at = first.find(b"Content-Length:")
        if at < 0:
            return 0
    end = first.find(b"\r\n", at)
    value = first[at + 15 : end if end >= 0 else None].strip()
    return int(value) if value.isdigit() else 0


def _is_chunked(first: bytes) -> bool:
    """The head that starts `first` announces a chunked body (a streaming endpoint's reply)."""
    head = first[: first.find(b"\r\n\r\n")].lower()
    return b"\r\ntransfer-encoding: chunked" in head


class ClientResponse:
    """A complete response. Headers are parsed from `raw` only when asked for: the relay path
    forwards `raw` untouched and never needs them. A large response keeps no `raw` (None): its
    body is received into one buffer, and relaying it means writing head and body again."""

    __slots__ = ("_headers", "body", "head", "raw", "status")

    def __init__(
        self,
        status: int,
        body: bytes | bytearray | BodyStream,
        raw: bytes | None,
        head: bytes = b"",
    ) -> None:
        self.status = status
        self.body = body
        self.raw = raw  # the response exactly as received, for relaying it unchanged
        self.head = head if raw is None else raw
        self._headers: dict[bytes, bytes] | None = None

    @property
    def headers(self) -> dict[bytes, bytes]:
        if self._headers is None:
            self._headers = _parse_headers(self.head)
        return self._headers


Callback = Callable[[ClientResponse | None, UpstreamError | None], None]


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.callback: Callback | None = None
        self.deadline = 0.0
        self.closed = False
        self._raw: list[bytes] = []
        self._body: list[bytes] = []
        self._big: BodyBuffer | None = None
        # Streaming (the router): a request body pumped from the caller's connection, and a
        # reply larger than `stream_above` handed on while it arrives.
        self.stream_above: int | None = None
        self._reply: BodyStream | None = None
        self.pumping: asyncio.Task[Any] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    def reset(self) -> None:
        self._raw = []
        self._body = []
        self._big = None
        self._reply = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        self.fail(ConnectionLost(str(exc or "connection closed by peer")))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def pump(self, body: BodyStream) -> None:
        """Write a streamed request body at the pace the replica reads it."""
        assert self.transport is not None
        try:
            await pipe(body, self.transport, self._can_write, self.deadline)
        except StreamError as exc:
            self.fail(BodyAbandoned(f"the caller's body did not arrive whole: {exc}"))
            self.abort()
        except TimeoutError as exc:
            self.fail(UpstreamTimeout(str(exc)))
            self.abort()
        except ConnectionError as exc:
            self.fail(ConnectionLost(f"the replica stopped taking the body: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def data_received(self, data: bytes) -> None:
        if self._big is None and self._reply is None:  # a large body's bytes are not kept
            self._raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ConnectionLost(f"malformed response: {exc}"))
            self.abort()

    # Only two parser callbacks: each costs a call from C into Python on every response.
    def on_body(self, body: bytes) -> None:
        if self._reply is not None:
            self._reply.feed(body)
            return
        if self._big is not None:
            if not self._big.add(body):
                self.fail(ConnectionLost("response body is longer than its content-length"))
                self.abort()
            return
        if not self._body:  # the first chunk: is the body large, or a stream of items?
            raw = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)  # the head
            if _is_chunked(raw):
                self._stream_reply(None, body)
                return
            length = _announced_length(raw)
            if self.stream_above is not None and length > self.stream_above:
                self._stream_reply(length, body)
                return
            if length > ONE_BUFFER:
                self._big = BodyBuffer(length)
                self._big.add(body)
                return
        self._body.append(body)

    def _stream_reply(self, length: int | None, first: bytes) -> None:
        """Hand the reply on now, its body following as it arrives (read at the caller's pace)."""
        transport = self.transport
        assert transport is not None
        self._reply = BodyStream(
            length, transport.pause_reading, transport.resume_reading, self.abort
        )
        head = b"".join(self._raw)
        self._raw = []
        self._reply.feed(first)
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(ClientResponse(self.parser.get_status_code(), self._reply, None, head), None)

    def on_message_complete(self) -> None:
        if self._reply is not None:  # answered already; the stream ends, the connection is free
            self._reply.end()
            self.reset()
            self._release()
            return
        raw: bytes | None = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)
        if self._big is not None:
            body: bytes | bytearray = self._big.buf
            head, raw = raw or b"", None
        else:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            head = b""
        self.reset()
        resp = ClientResponse(self.parser.get_status_code(), body, raw, head)
        callback, self.callback = self.callback, None
        self._release()
        if callback is not None:
            callback(resp, None)

    def _release(self) -> None:
        """Back to the pool, or closed when the replica said so (or the pool is full)."""
        self.pool.busy.discard(self)
        if not self.parser.should_keep_alive():
            self.abort()
        elif len(self.pool.idle) < self.pool.max_idle:
            self.pool.idle.append(self)
        else:
            self.abort()

    def fail(self, error: UpstreamError) -> None:
        callback, self.callback = self.callback, None
        self.pool.busy.discard(self)
        if self._reply is not None:
            self._reply.fail(StreamError(str(error)))
            self._reply = None
        if callback is not None:
            callback(None, error)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A pool of keep-alive connections to one `host:port`.

    Timeouts are deadlines checked by `expire()`, which the owner calls periodically, instead
    of one timer per request: a timer costs more than the rest of a relayed call's bookkeeping.
    """

    def __init__(
        self, host: str, port: int, max_idle: int = 256, tls: ClientTls | None = None
    ) -> None:
        """`tls`: the context and the name the server must prove (else plain TCP)."""
        self.host = host
        self.port = port
        self.secure: dict[str, Any] = (
            {"ssl": tls.context, "server_hostname": tls.name, "ssl_handshake_timeout": 10}
            if tls
            else {}
        )
        self.max_idle = max_idle
        self.idle: deque[_Connection] = deque()
        self.busy: set[_Connection] = set()
        self.host_header = f"{host}:{port}".encode()

    def _take_idle(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, **self.secure
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def _dispatch(
        self,
        conn: _Connection,
        method: bytes,
        path: bytes,
        headers: bytes,
        body: Any,
        timeout: float,
        callback: Callback,
        stream_above: int | None = None,
    ) -> None:
        conn.callback = callback
        conn.deadline = time.monotonic() + timeout
        conn.reset()
        self.busy.add(conn)
        head = (
            method,
            b" ",
            path,
            b" HTTP/1.1\r\nhost: ",
            self.host_header,
            b"\r\ncontent-length: ",
            str(body_length(body)).encode(),
            b"\r\n",
            headers,
            b"\r\n",
        )
        transport = conn.transport
        assert transport is not None
        conn.stream_above = stream_above
        if isinstance(body, BodyStream):
            transport.write(b"".join(head))
            conn.pumping = asyncio.get_running_loop().create_task(conn.pump(body))
            return
        parts = body_parts(body)
        if body_length(body) < ONE_BUFFER:  # small: one write, one segment
            transport.write(b"".join((*head, *parts)))
        else:  # the body's own buffers follow the head: a large body is never joined here
            transport.write(b"".join(head))
            conn.pumping = asyncio.get_running_loop().create_task(
                write_paced(transport, parts, conn._can_write)
            )

    def send(
        self,
        method: bytes,
        path: bytes,
        headers: bytes,
        body: Any,
        timeout: float,
        callback: Callback,
        stream_above: int | None = None,
    ) -> bool:
        """Send on a pooled connection and return True, or return False when none is idle.

        `headers` are pre-rendered `name: value\\r\\n` lines; `callback(response, error)`
        runs when the answer is complete or the request failed; a reply larger than
        `stream_above` bytes is handed over at once, its body a BodyStream.
        """
        conn = self._take_idle()
        if conn is None:
            return False
        self._dispatch(conn, method, path, headers, body, timeout, callback, stream_above)
        return True

    async def request(
        self,
        method: bytes,
        path: bytes,
        headers: bytes,
        body: Any,
        timeout: float,
        connect_timeout: float | None = None,
        stream_above: int | None = None,
    ) -> ClientResponse:
        """Send one request, opening a connection when none is idle (within `connect_timeout`,
        else `timeout`)."""
        conn = self._take_idle() or await self._connect(connect_timeout or timeout)
        fut: asyncio.Future[ClientResponse] = asyncio.get_running_loop().create_future()

        def done(resp: ClientResponse | None, error: UpstreamError | None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(resp)  # type: ignore[arg-type]

        self._dispatch(conn, method, path, headers, body, timeout, done, stream_above)
        try:
            return await fut
        except asyncio.CancelledError:
            conn.abort()  # the response would arrive on a connection nobody waits on
            raise

    def expire(self, now: float) -> None:
        """Fail every request whose deadline has passed (its connection cannot be reused)."""
        for conn in [c for c in self.busy if c.deadline <= now]:
            conn.fail(UpstreamTimeout("no response before the deadline"))
            conn.abort()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()
        for conn in list(self.busy):
            conn.abort()
