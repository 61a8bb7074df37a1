"""Server side: one `HttpProtocol` per connection, handing complete requests to a handler."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from kubeforge.contract import H_SESSION
from kubeforge.http.buffers import POOL
from kubeforge.http.stream import BodyStream, StreamError, pipe, pipe_chunked, write_paced

log = logging.getLogger("kubeforge.http")

# asyncio's own way to make a task current while code runs outside its step (Python 3.12's
# eager tasks use them); `Handling.begin` needs just that.
_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task

JSON_TYPE = b"application/json"
MAX_HEAD = 64 * 1024  # bytes of one request head (request line and headers); more gets 431
# A body larger than this is received into one buffer of its announced length, which decoded
# arrays then view (writable); smaller ones are joined from their chunks.
ONE_BUFFER = 64 * 1024


def body_length(body: Any) -> int:
    """Bytes of a body: bytes-like, or a message as parts (`kubeforge.values.Encoded`)."""
    parts = getattr(body, "parts", None)
    return body.nbytes if parts is not None else len(body)


def body_parts(body: Any) -> list[Any]:
    """What to write for a body, in order, without joining it first."""
    parts = getattr(body, "parts", None)
    return parts if parts is not None else [body]


class BodyBuffer:
    """A body of known length received into one writable buffer (a large one from the pool,
    where it is used again once nothing views it)."""

    __slots__ = ("buf", "filled", "view")

    def __init__(self, length: int) -> None:
        self.buf = POOL.take(length)
        self.view = memoryview(self.buf)
        self.filled = 0

    def add(self, chunk: bytes) -> bool:
        """Copy in a chunk; False when it would overflow the announced length."""
        end = self.filled + len(chunk)
        if end > len(self.buf):
            return False
        self.view[self.filled : end] = chunk
        self.filled = end
        return True


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[bytes, bytes],
        body: bytes | bytearray | memoryview | BodyStream,  # a stream where the server streams
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: Any = b"",  # bytes-like, or a message as parts (kubeforge.values.Encoded)
        content_type: bytes = JSON_TYPE,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


Handler = Callable[[Request], Coroutine[Any, Any, Response]]  # stepped by `Handling`
ErrorRenderer = Callable[[int, str], Response]
# A synchronous first look at each request. It returns True when it has taken the request and
# will answer later through `conn.answer(req, ...)`; False hands the request to `Handler`.
# The router relays calls this way: no task, no coroutine, no future per request.
FastPath = Callable[[Request, "HttpProtocol"], bool]

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()


def render(resp: Response, keep_alive: bool) -> bytes:
    """The whole answer as one string (bodies of parts: `render_parts`)."""
    return b"".join(render_parts(resp, keep_alive))


def render_parts(resp: Response, keep_alive: bool) -> list[Any]:
    """The answer as the pieces to write: its head joined, then the body's own buffers."""
    length = body_length(resp.body)
    extra = b"".join(b"%s: %s\r\n" % pair for pair in resp.headers) if resp.headers else b""
    head = b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n" % (
        status_line(resp.status),
        resp.content_type,
        length,
        extra,
        b"" if keep_alive else b"connection: close\r\n",
    )
    if length >= ONE_BUFFER:
        return [head, *body_parts(resp.body)]
    return [b"".join((head, *body_parts(resp.body)))]  # small: one write, one segment


def _with_length(head: bytes, length: int | None, keep_alive: bool) -> bytes:
    """A head rendered for an empty body, with the streamed body's length instead (None:
    chunked, the length known at its end)."""
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    head = head.replace(b"content-length: 0", framing, 1)
    if not keep_alive:
        head = head[:-2] + b"connection: close\r\n\r\n"
    return head


def default_error(status: int, message: str) -> Response:
    import json

    body = json.dumps({"error": {"type": "HTTPError", "message": message}}).encode()
    return Response(status, body)


# Where each read lands while the parser takes the bytes (heads, small bodies): one buffer for
# every connection, as the parser has copied what it keeps before the next read.
_SCRATCH = memoryview(bytearray(256 * 1024))
# Headers a request may carry once: two sessions (each could be a name) cannot both be meant.
_ONCE = frozenset({H_SESSION})
# A streamed body is read in chunks this large, each passed on whole (pooled: written again
# once every connection it was passed to has sent it).
STREAM_CHUNK = 1 << 20
# How long a connection that answered before its request's body ended goes on reading (and
# dropping) that body, so that the caller still writing it gets the answer.
LINGER = 2.0


class HttpProtocol(asyncio.BufferedProtocol):
    """Parses requests with llhttp and answers them in order, one handler at a time, in a task
    of the connection's (`_run_handlers`).

    The rest of a large body, once its head is parsed, is read straight into the body's own
    buffer (`get_buffer`), bypassing the parser: a byte of it is copied once, by the kernel.
    """

    def __init__(
        self,
        handler: Handler,
        connections: set[HttpProtocol],
        max_body: int,
        on_error: ErrorRenderer = default_error,
        fast: FastPath | None = None,
        stream_above: int | None = None,
        starts: Starts | None = None,
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.starts = starts if starts is not None else Starts()  # one per server, shared
        # Bodies larger than this are handed to the handler as a BodyStream while they arrive
        # (the router); None receives every body whole first (the replica).
        self.stream_above = stream_above
        self.connections = connections
        self.max_body = max_body
        self.on_error = on_error
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request] = deque()
        self.current: Request | None = None  # answered before the next one starts
        self.closing = False
        self.paused = False
        # Set when reading is over (the peer half-closed, a request said `connection: close`,
        # or bytes could not be parsed): the answers still owed go out in order, then it closes.
        self._last: tuple[int, str] | None = None  # an error answered after those
        self._finishing = False
        # Per-message parse state.
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._big: BodyBuffer | None = None  # a large body of announced length
        self._direct = False  # reads go into `_big`, not through the parser
        self._stream: BodyStream | None = None  # a body streaming on while it arrives
        self._chunk: memoryview | bytearray | None = None  # where its next bytes are read to
        self._chunk_filled = 0
        self._reading_paused = False  # by a stream whose reader is behind
        self._answering: BodyStream | None = None  # an answer streaming out now
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._body_len = 0
        self._too_large = False
        self._dropping = False  # the rest of a streamed body is read and dropped
        # Head size: chunks that arrive wholly inside one head are counted (llhttp itself keeps
        # no limit); the chunk a head starts in is not, and is bounded by the read size.
        self._in_head = False
        self._heads = 0
        self._head_bytes = 0
        self._head_size = 0  # the head being parsed: request target and header lines
        self.read_before = b""  # an adopted connection's bytes that another reader took
        # The connection's handler task (`_run_handlers`), the handler it runs next, and the
        # future it waits on when there is none.
        self._worker: asyncio.Task[None] | None = None
        self._next: Handling | None = None
        self._idle: asyncio.Future[None] | None = None

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        if self.read_before:  # before the transport reads anything itself
            data, self.read_before = self.read_before, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        self.pending.clear()
        self._wake_worker()  # it sees `closing` and ends
        self._can_write.set()  # a streaming answer stops waiting and sees `closing`
        if self._stream is not None:
            self._stream.fail(StreamError("the caller's connection closed during its body"))
        if self._answering is not None:  # its producer stops now, not at its next chunk
            self._answering.cancel("the caller's connection closed during the answer")

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._direct:
            return _SCRATCH
        big = self._big
        if big is not None:
            return big.view[big.filled :]
        chunk, filled = self._chunk, self._chunk_filled  # a streamed body
        assert chunk is not None and self._stream is not None
        left = self._stream.length - self._body_len  # never past the body: a next request's
        return chunk[filled : filled + min(len(chunk) - filled, left)]  # bytes go to the parser

    def buffer_updated(self, nbytes: int) -> None:
        if not self._direct:
            self.data_received(_SCRATCH[:nbytes])
            return
        self._body_len += nbytes
        big = self._big
        if big is not None:
            big.filled += nbytes
            if big.filled == len(big.buf):
                self._direct_body_ended()
            return
        stream, chunk = self._stream, self._chunk
        assert stream is not None and chunk is not None
        self._chunk_filled += nbytes
        ended = self._body_len == stream.length
        if ended:
            stream.feed(chunk[: self._chunk_filled])
            self._direct_body_ended()
        elif self._chunk_filled == len(chunk):
            stream.feed(chunk)
            self._chunk, self._chunk_filled = POOL.take(STREAM_CHUNK), 0

    def _direct_body_ended(self) -> None:
        # The parser still counts the body's bytes it never saw: the message ends here, and the
        # next one starts on a parser of its own.
        self._direct = False
        self.on_message_complete()
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._too_large or self._finishing:
            return  # an oversized body, or bytes after the last request: dropped
        began, heads = self._in_head, self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not (self._too_large or self._finishing):  # after `close`, bytes are dropped
                self._fail(400, f"malformed HTTP request: {exc}")
        if began and self._in_head and heads == self._heads:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(431, f"request head exceeds {MAX_HEAD} bytes")

    def eof_received(self) -> bool:
        """The peer half-closed: answer what it already sent, then close."""
        if self.closing:
            return False  # lingering after the last answer: the caller is done too
        if self._stream is not None:  # mid-body: what was passed on of it will not be whole
            got, length = self._body_len, len(self._stream)
            self._stream.fail(StreamError(f"the caller's body ended at {got} of {length} bytes"))
        self._finish()
        return True  # keep the transport open for those answers

    # httptools callbacks -------------------------------------------------------------------
    # Each callback is a call from C into Python on every request, so there are as few as the
    # protocol allows: per-message state is reset when a message completes, and the header
    # checks that need no other header (size limit, 100-continue) run as the header arrives.

    def _reset(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._big = None
        self._direct = False
        self._stream = None
        self._chunk = None
        self._body_len = 0
        self._in_head = False
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        if not self._in_head:
            self._in_head = True
            self._heads += 1
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # optional whitespace is not part of the value (RFC 9110)
        if name in _ONCE and name in self._headers:
            self._fail(400, f"more than one {name.decode()} header")
        self._headers[name] = value
        # However the head arrived (one read or many), its size counts: name, value, ": ", CRLF.
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            self._fail(431, f"request head exceeds {MAX_HEAD} bytes")
        if name == b"content-length":
            if value.isdigit() and int(value) > self.max_body:
                self._too_large_reply()
        elif (
            name == b"expect"
            and value.lower() == b"100-continue"
            and self.transport
            and self.current is None  # only the request answered next: never between answers
            and not self.pending
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        if self._too_large:
            return
        if not self._body_len:
            announced = self._headers.get(b"content-length", b"")
            length = int(announced) if announced.isdigit() else 0
            if self.stream_above is not None and length > self.stream_above:
                self._start_stream(length)
            elif length > ONE_BUFFER:
                self._big = BodyBuffer(length)
        self._body_len += len(body)
        if self._body_len > self.max_body:
            self._too_large_reply()
            return
        if self._stream is not None:
            self._stream.feed(body)
            if self._body_len < self._stream.length:  # the next reads go into chunks of its own
                self._chunk, self._chunk_filled = POOL.take(STREAM_CHUNK), 0
                self._direct = True
        elif self._big is None:
            self._body.append(body)
        elif not self._big.add(body):
            self._fail(400, "request body is longer than its content-length")
        elif self._big.filled < len(self._big.buf):
            self._direct = True  # this read ended inside the body: the next ones go into it

    def on_message_complete(self) -> None:
        if self._stream is not None:  # its request is being answered already
            self._stream.end()
            if not self.parser.should_keep_alive():
                self._finishing = True
            self._reset()
            return
        if self._too_large or self.closing or self._last is not None:
            return
        if self.parser.should_upgrade():
            self._fail(400, "protocol upgrades are not supported")  # instead of an answer
            return
        if not self.parser.should_keep_alive():
            self._finishing = True  # its answer closes the connection: nothing after it counts
        if self._big is not None:
            body: bytes | bytearray = self._big.buf
        else:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req = self._request(body)
        self._reset()
        self._deliver(req)

    def _request(self, body: bytes | bytearray | BodyStream) -> Request:
        path, _, query = self._url.partition(b"?")
        return Request(
            self.parser.get_method().decode("latin-1"),
            unquote(path.decode("latin-1")) if b"%" in path else path.decode("latin-1"),
            query.decode("latin-1") if query else "",
            self._headers,
            body,
            self.parser.should_keep_alive(),
        )

    def _deliver(self, req: Request) -> None:
        if self.current is not None:
            self.pending.append(req)
            if len(self.pending) > 32 and not self.paused and self.transport:
                self.paused = True
                self.transport.pause_reading()
        else:
            self._start(req)

    def _start_stream(self, length: int) -> None:
        """A large body: its request goes to the handler now, its body follows as it comes."""
        self._stream = BodyStream(length, self._pause_body, self._resume_body, self._drop_body)
        self._deliver(self._request(self._stream))

    def _drop_body(self) -> None:
        """The streamed body's reader gave up (its replica stopped reading, or the deadline
        passed): its rest is read and dropped, and the connection closes after its answer. A
        caller still writing its body then reads that answer; closing with unread bytes would
        make the kernel send a reset, which can reach the caller before the answer does."""
        if self._stream is None:
            return
        self._stream.fail(StreamError("the body's reader went away"))
        self._direct = False  # reads go to the scratch buffer and are dropped
        self._finishing = True
        self._dropping = True
        self._resume_body()  # a body paused for its slow reader is drained now

    def _pause_body(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            if not self.paused:
                self.transport.pause_reading()

    def _resume_body(self) -> None:
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            if not self.paused and not self.closing:
                self.transport.resume_reading()

    # answering -----------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self.current = req
        if self.fast is not None:
            try:
                if self.fast(req, self):
                    return
            except Exception as exc:
                self.crashed(req, exc)
                return
        self._next = Handling(req, self.handler(req))
        if self._idle is not None:  # the connection's task waits: begun with the others read
            self.starts.add(self)
        elif self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run_handlers())
        else:
            self._wake_worker()

    def begin_next(self) -> None:
        """Run the next handler's first step now, as the connection's task (most handlers
        finish in it); the task takes it over only if it waits."""
        handling = self._next
        if handling is None or self._idle is None:
            return  # the task took it over meanwhile (the connection closed)
        try:
            finished = handling.begin(self._worker)
        except Exception as exc:
            self._next = None
            self.crashed(handling.req, exc)
            return
        if finished:
            self._next = None
            self.answer(handling.req, handling.result)
        else:
            self._wake_worker()

    def _wake_worker(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)

    async def _run_handlers(self) -> None:
        """Every handler of the connection, one request after another, as this one task: a
        connection answers in order and starts a request only once the one before it is
        answered, so a task made per request (which costs more than a small call) would
        never run beside another. Each handler still has a context of its own."""
        loop = asyncio.get_running_loop()
        while True:
            handling, self._next = self._next, None
            if handling is not None:
                await self._run_handler(handling)
            elif self.closing:
                return
            else:
                self._idle = loop.create_future()
                try:
                    await self._idle
                except asyncio.CancelledError as exc:
                    # Meant for a handler begun in `begin_next` that this task had not taken
                    # over yet (a deadline already past when its first step set it): it gets
                    # it where it waits, as a task of its own would have.
                    begun = self._next
                    if begun is None or not begun.begun:
                        raise
                    begun.thrown = exc
                    if isinstance(begun.waiting_on, asyncio.Future):
                        begun.waiting_on.cancel()

    async def _run_handler(self, handling: Handling) -> None:
        try:
            resp = await handling
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the connection's task itself is cancelled: the server stops
            self.crashed(handling.req, exc)  # something the handler awaited was cancelled
            return
        except Exception as exc:
            self.crashed(handling.req, exc)
            return
        self.answer(handling.req, resp)

    def crashed(self, req: Request, exc: BaseException) -> None:
        """A bug in a handler: answer 500, log it, keep serving the connection."""
        log.error("handler failed for %s %s", req.method, req.path, exc_info=exc)
        self.answer(req, self.on_error(500, f"internal error: {type(exc).__name__}: {exc}"))

    def answer(self, req: Request, resp: Response | bytes) -> None:
        """Write the answer to `req` (a Response, or a complete raw HTTP response to relay)."""
        if self.closing or self.transport is None or req is not self.current:
            if isinstance(resp, Response) and isinstance(resp.body, BodyStream):
                resp.body.cancel("the caller is gone")
            return
        if self._stream is not None and req.body is self._stream:
            self._drop_body()  # answered before its body arrived: the rest is not wanted
        if self._dropping:
            req.keep_alive = False  # this answer is the connection's last
        if isinstance(resp, bytes):
            self.transport.write(resp)
        elif isinstance(resp.body, BodyStream):
            head = render_parts(Response(resp.status, b"", resp.content_type, resp.headers), True)
            self.transport.write(_with_length(head[0], resp.body.length, req.keep_alive))
            self._answering = resp.body
            asyncio.get_running_loop().create_task(self._stream_answer(req, resp.body))
            return
        else:
            parts = render_parts(resp, req.keep_alive)
            if len(parts) > 1:  # a large body: written as the caller takes it
                self.transport.write(parts[0])
                asyncio.get_running_loop().create_task(self._write_answer(req, parts[1:]))
                return
            self.transport.write(parts[0])
        self._answered(req)

    async def _write_answer(self, req: Request, parts: list[Any]) -> None:
        assert self.transport is not None
        if await write_paced(self.transport, parts, self._can_write) and not self.closing:
            self._answered(req)

    async def _stream_answer(self, req: Request, body: BodyStream) -> None:
        """A large answer, written as it arrives, at the pace the caller reads it."""
        assert self.transport is not None
        try:
            if body.length is None:
                written = await pipe_chunked(body, self.transport, self._can_write)
            else:
                written = await pipe(body, self.transport, self._can_write)
            if not written:
                return  # the caller is gone
        except (StreamError, ConnectionError) as exc:
            # The head promised a length (or a last chunk) it cannot keep: the caller sees a
            # short body. A caller that went away (as one that stops reading a stream of items
            # does) is no fault of ours: only the other causes are warned of.
            level = logging.DEBUG if self.closing else logging.WARNING
            log.log(level, "answer to %s %s cut short: %s", req.method, req.path, exc)
            self.close()
            return
        finally:
            self._answering = None
        if not self.closing:
            self._answered(req)

    def _answered(self, req: Request) -> None:
        """`req` is answered: close, or start the next request read meanwhile."""
        assert self.transport is not None
        if not req.keep_alive:
            self._close_now()
            return
        self.current = None
        if self.pending:
            if self.paused and len(self.pending) < 8 and not self._finishing:
                self.paused = False
                if not self._reading_paused:
                    self.transport.resume_reading()
            self._start(self.pending.popleft())
        elif self._finishing:
            self._close_now()

    def _too_large_reply(self) -> None:
        """Answer 413 (after the answers still owed), dropping the rest of the body."""
        self._too_large = True
        self._fail(413, f"request body exceeds {self.max_body} bytes")

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed or accepted, then close the connection: after
        the answers still owed to the requests before it, which keep their order."""
        if self._last is None:
            self._last = (status, message)
        self._finish()

    def _finish(self) -> None:
        """Read no more; close once every request read so far is answered."""
        self._finishing = True
        if self.current is None and not self.pending:
            self._close_now()

    def _close_now(self) -> None:
        if self.transport is None or self.closing:
            self.close()
            return
        if self._last is not None:
            self.transport.write(render(self.on_error(*self._last), keep_alive=False))
        if (self._too_large or self._dropping) and self.transport.can_write_eof():
            # Keep reading (and dropping) the body for a moment: closing with unread data makes
            # the kernel send RST, and a client still writing its body would lose the answer.
            # The caller's own close (EOF) ends the wait early.
            self.transport.write_eof()
            self.closing = True
            asyncio.get_running_loop().call_later(LINGER, self.close)
            return
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport and not self.transport.is_closing():
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self.current is None


class Starts:
    """The handlers to begin, gathered while the loop reads its connections and begun together
    right after (`HttpProtocol.begin_next`): the answers then go out in one burst after the
    reads, as they would from tasks, which the peer reads in fewer wakeups than answers written
    between reads; and no task is woken for a handler that finishes in its first step."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: list[HttpProtocol] = []

    def add(self, conn: HttpProtocol) -> None:
        if not self.queue:
            asyncio.get_running_loop().call_soon(self.run)
        self.queue.append(conn)

    def run(self) -> None:
        queue, self.queue = self.queue, []
        for conn in queue:
            conn.begin_next()


class Handling:
    """A handler's coroutine, each of its steps run in a context of its own (as if it were a
    task of its own, for its contextvars), while a connection's task runs it.

    `begin` runs its first step at once, with that task entered as the current one, so that
    code which asks for the current task (`asyncio.timeout`) finds the task that goes on with
    it; awaiting it then goes on from there (or from the start, if it was not begun).
    """

    __slots__ = ("begun", "context", "coro", "req", "result", "thrown", "waiting_on")

    def __init__(self, req: Request, coro: Coroutine[Any, Any, Any]) -> None:
        self.req = req
        self.coro = coro
        self.context = contextvars.copy_context()
        self.begun = False
        self.waiting_on: Any = None  # what its first step left it waiting on
        self.thrown: BaseException | None = None  # thrown at it before it was taken over
        self.result: Any = None

    def begin(self, task: asyncio.Task[Any] | None) -> bool:
        """Its first step, as `task`: True when it finished (`result`); its errors come out."""
        loop = asyncio.get_running_loop()
        _enter_task(loop, task)
        try:
            self.waiting_on = self.context.run(self.coro.send, None)
        except StopIteration as stop:
            self.result = stop.value
            return True
        finally:
            _leave_task(loop, task)
        self.begun = True
        return False

    def __await__(self) -> Generator[Any, Any, Any]:
        run, coro = self.context.run, self.coro
        step, arg = coro.send, None
        if self.thrown is not None:
            step, arg = coro.throw, self.thrown
        elif self.begun:
            try:
                arg = yield self.waiting_on
            except BaseException as exc:  # a cancellation (a deadline), or an error thrown in
                step, arg = coro.throw, exc
        while True:
            try:
                waiting_on = run(step, arg)
            except StopIteration as stop:
                return stop.value
            step = coro.send
            try:
                arg = yield waiting_on
            except BaseException as exc:
                step, arg = coro.throw, exc


class HttpServer:
    """Binds a handler to a host and port; `shutdown` stops accepting and closes idle peers."""

    def __init__(
        self,
        handler: Handler,
        max_body: int,
        on_error: ErrorRenderer = default_error,
        fast: FastPath | None = None,
        stream_above: int | None = None,
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.stream_above = stream_above
        self.max_body = max_body
        self.on_error = on_error
        self.connections: set[HttpProtocol] = set()
        self.starts = Starts()
        self.server: asyncio.AbstractServer | None = None
        self._adopting: set[asyncio.Task[Any]] = set()

    def _protocol(self) -> HttpProtocol:
        return HttpProtocol(
            self.handler,
            self.connections,
            self.max_body,
            self.on_error,
            self.fast,
            self.stream_above,
            self.starts,
        )

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        loop = asyncio.get_running_loop()
        secure = {"ssl": tls, "ssl_handshake_timeout": 10} if tls is not None else {}
        self.server = await loop.create_server(self._protocol, host, port, backlog=1024, **secure)
        return self.server.sockets[0].getsockname()[1]

    def adopt(self, sock: socket.socket, read_before: bytes) -> None:
        """Serve a connection accepted elsewhere (by the native relay), whose first
        `read_before` bytes were read there."""

        def protocol() -> HttpProtocol:
            proto = self._protocol()
            proto.read_before = read_before
            return proto

        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(protocol, sock))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; let busy connections finish within `grace` seconds; close all."""
        self.stop_accepting()
        deadline = asyncio.get_running_loop().time() + grace
        while any(not c.idle for c in self.connections):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self.server is not None:
            await self.server.wait_closed()
