"""A body that streams through the router: chunks pass from one connection to another with
bounded buffering, so a gigabyte call never sits whole in the router's memory.

The producer (the connection reading the body) feeds chunks and pauses its reading while more
than `HIGH` bytes wait; the consumer (the connection writing it on) takes them, which resumes
the producer below `LOW`. A broadcast tees one body into one branch per replica: the caller's
connection is read at the pace of the slowest replica, and the body is uploaded once.

The server reads a streamed body in 1 MiB pooled chunks straight from the socket, and `pipe`
writes each connection's chunks from a thread of its own. Both are for a 2-core machine's sake:
a 256 MB broadcast to 4 replicas ran at 0.57x four parallel raw sends with 256 KiB chunks
written by the event loop, and at 0.75-0.85x with these (bench/payloads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

HIGH = 4 << 20  # bytes waiting in one stream before its producer pauses
LOW = 1 << 20  # and below which it resumes
WRITE_CHUNK = 1 << 20  # a large body is handed to its transport this much at a time
WRITER_THREAD = "kubeforge-pipe"  # the OS name of a thread writing a streamed body
_NO_DEADLINE = 24 * 3600.0  # a writer's timeout when its caller set none


def slices(parts: Iterable[Any]) -> Iterator[memoryview]:
    """A body's parts as views of at most WRITE_CHUNK bytes, in order, nothing copied."""
    for part in parts:
        view = memoryview(part).cast("B")
        for offset in range(0, view.nbytes, WRITE_CHUNK):
            yield view[offset : offset + WRITE_CHUNK]


async def write_paced(
    transport: asyncio.Transport, parts: list[Any], can_write: asyncio.Event
) -> bool:
    """Write a large body's parts in chunks, each once the transport has room for it.

    One `write` of a large buffer makes asyncio's transport copy what the socket did not take
    at once, and (before Python 3.12) shift its buffer after every send: time quadratic in the
    size. Paced, the transport never holds more than a chunk. False if the connection closed.
    """
    for chunk in slices(parts):
        if transport.is_closing():
            return False
        transport.write(chunk)
        if not can_write.is_set():
            await can_write.wait()
    return not transport.is_closing()


async def pipe(
    body: BodyStream,
    transport: asyncio.Transport,
    can_write: asyncio.Event,
    deadline: float | None = None,
) -> bool:
    """Write a streamed body on as it arrives, at the pace the transport's peer reads it.
    False (and the body's producer stopped) when the transport closed first; raises
    StreamError when the body's producer went away, ConnectionError when the peer did, and
    TimeoutError when the peer had not taken it all by `deadline` (time.monotonic()).

    The bytes are written by a thread of their own, on the transport's socket: the event
    loop then only reads (the body from its producer, anything else from anyone), and the
    kernel's copies into several sockets (a broadcast's branches) run on as many cores.
    """
    sock = transport.get_extra_info("socket")
    # Raw bytes on the socket: never under TLS, where only the transport may write.
    plain = sock is not None and transport.get_extra_info("sslcontext") is None
    if plain and not transport.is_closing():
        return await _pipe_in_thread(body, transport, sock.fileno(), deadline)
    return await _pipe_on_loop(body, transport, can_write)


async def pipe_chunked(
    body: BodyStream, transport: asyncio.Transport, can_write: asyncio.Event
) -> bool:
    """Write a body of unknown length as HTTP chunks, each as soon as it arrives (a stream's
    items are small and wanted now: no writer thread between them and the socket), at the
    pace the peer reads. Ends with the last chunk; False when the transport closed first."""
    async for chunk in body.chunks():
        if transport.is_closing():
            body.cancel("the connection it was written to closed")
            return False
        transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        if not can_write.is_set():
            await can_write.wait()
    if transport.is_closing():
        return False
    transport.write(b"0\r\n\r\n")
    return True


async def _pipe_on_loop(
    body: BodyStream, transport: asyncio.Transport, can_write: asyncio.Event
) -> bool:
    async for chunk in body.chunks():
        if transport.is_closing():
            body.cancel("the connection it was written to closed")
            return False
        transport.write(chunk)
        if not can_write.is_set():
            await can_write.wait()
    return True


async def _pipe_in_thread(
    body: BodyStream, transport: asyncio.Transport, fd: int, deadline: float | None
) -> bool:
    while transport.get_write_buffer_size():  # the head, when the socket did not take it whole
        if transport.is_closing():
            return False
        await asyncio.sleep(0.001)
    writer = _SocketWriter(fd, deadline)
    try:
        async for chunk in body.chunks():
            if transport.is_closing():
                body.cancel("the connection it was written to closed")
                return False
            await writer.put(chunk)
        await writer.finish()
    except BaseException:
        writer.abort()
        raise
    return True


class _SocketWriter:
    """One thread writing chunks to a socket (a duplicate of the transport's descriptor, so
    closing the transport cannot pull it from under a send), at most `HIGH` bytes behind."""

    def __init__(self, fd: int, deadline: float | None) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        # Always a timeout: `None` would make the descriptor blocking, for the event loop too
        # (the duplicate shares the socket's flags).
        self.deadline = deadline
        self.sock.settimeout(self._left())
        self.loop = asyncio.get_running_loop()
        self.chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.queued = 0
        self.lock = threading.Lock()
        self.room = asyncio.Event()
        self.room.set()
        self.done: asyncio.Future[BaseException | None] = self.loop.create_future()
        threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True).start()

    def _left(self) -> float:
        left = _NO_DEADLINE if self.deadline is None else self.deadline - time.monotonic()
        return max(0.001, left)

    async def put(self, chunk: Any) -> None:
        if self.done.done():
            raise self._failure()
        with self.lock:
            self.queued += len(chunk)
            if self.queued > HIGH:
                self.room.clear()
        self.chunks.put(chunk)
        await self.room.wait()  # set again below LOW, or when the thread stopped

    async def finish(self) -> None:
        self.chunks.put(None)
        if await asyncio.shield(self.done) is not None:
            raise self._failure()

    def abort(self) -> None:
        self.chunks.put(None)
        if not self.done.done():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _failure(self) -> OSError:
        exc = self.done.result()
        if isinstance(exc, TimeoutError):  # the socket's timeout is the call's deadline
            return TimeoutError(f"the peer did not take the body by the deadline: {exc}")
        return ConnectionError(f"writing the body failed: {exc}")

    def _run(self) -> None:
        _name_thread(WRITER_THREAD)
        error: BaseException | None = None
        try:
            while (chunk := self.chunks.get()) is not None:
                try:
                    if self.deadline is not None:  # the call's deadline, not a chunk's
                        self.sock.settimeout(self._left())
                    self.sock.sendall(chunk)
                except OSError as exc:
                    error = exc
                with self.lock:
                    self.queued -= len(chunk)
                    if self.queued < LOW and not self.room.is_set():
                        self.loop.call_soon_threadsafe(self.room.set)
                if error is not None:
                    break
        finally:
            self.sock.close()
            self.loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(error)
        self.room.set()


def _name_thread(name: str) -> None:
    """The OS-level name (`top -H`, /proc/PID/task/TID/comm), which Python 3.11 leaves as the
    process's own: an operator can tell a body's writer from the event loop."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class StreamError(ConnectionError):
    """The body's producer went away (or a consumer gave up) before the body was complete."""


class BodyStream:
    """A body arriving in chunks, of known `length` or (None) of a length known at its end (a
    chunked reply: a streaming endpoint's items); read it once with `chunks()`."""

    def __init__(
        self,
        length: int | None,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> None:
        self.length = length
        self.started = False  # a chunk has been taken: the body cannot be sent again
        self._pause, self._resume, self._cancel = pause, resume, cancel
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._received = 0
        self._done = False
        self._error: BaseException | None = None
        self._paused = False
        self._wake: asyncio.Event = asyncio.Event()
        self._finished: list[Callable[[bool], None]] = []

    @property
    def finished(self) -> bool:
        """All of it arrived, or it failed: nothing more will come."""
        return self._done or self._error is not None

    def when_finished(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(whole)` once nothing more will come: True when all of it arrived."""
        if self.finished:
            callback(self._done)
        else:
            self._finished.append(callback)

    def _settled(self) -> None:
        callbacks, self._finished = self._finished, []
        for callback in callbacks:
            callback(self._done)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("a chunked body has no length before its end")
        return self.length

    # producer side --------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        if self._done or self._error is not None:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._received += len(chunk)
        self._wake.set()
        if self._buffered > HIGH and not self._paused and self._pause is not None:
            self._paused = True
            self._pause()

    def end(self) -> None:
        if self.length is not None and self._received != self.length and self._error is None:
            self.fail(StreamError(f"body ended at {self._received} of {self.length} bytes"))
            return
        self._done = True
        self._wake.set()
        self._settled()

    def fail(self, error: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._error = error
        self._chunks.clear()
        self._wake.set()
        self._settled()

    # consumer side --------------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.started:
            raise StreamError("a streamed body can be read only once")
        self.started = True
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < LOW and self._resume is not None:
                    self._paused = False
                    self._resume()
                yield chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return
            self._wake.clear()
            await self._wake.wait()

    def cancel(self, why: str = "the body's reader went away") -> None:
        """The consumer gives up: stop the producer (its connection is closed)."""
        self.fail(StreamError(why))
        if self._cancel is not None:
            self._cancel()

    def tee(self, n: int) -> list[BodyStream]:
        """`n` branches of this body, fed by one reader at the pace of the slowest branch."""
        branches: list[BodyStream] = []
        more = asyncio.Event()
        more.set()

        def resumed() -> None:
            if all(not b._paused for b in branches):
                more.set()

        for _ in range(n):
            branches.append(BodyStream(self.length, more.clear, resumed, self.cancel))

        async def pump() -> None:
            try:
                async for chunk in self.chunks():
                    for branch in branches:
                        branch.feed(chunk)
                    await more.wait()
                for branch in branches:
                    branch.end()
            except BaseException as exc:
                for branch in branches:
                    branch.fail(exc if isinstance(exc, Exception) else StreamError(str(exc)))

        self._tee_task = asyncio.get_running_loop().create_task(pump())
        return branches
