"""A body that streams through the router: chunks pass from one connection to another with
bounded buffering, so a gigabyte call never sits whole in the router's memory.

The producer (the connection reading the body) feeds chunks and pauses its reading while more
than `HIGH` bytes wait; the consumer (the connection writing it on) takes them, which resumes
the producer below `LOW`. A broadcast tees one body into one branch per replica: the caller's
connection is read at the pace of the slowest replica, and the body is uploaded once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

HIGH = 4 << 20  # bytes waiting in one stream before its producer pauses
LOW = 1 << 20  # and below which it resumes
WRITE_CHUNK = 1 << 20  # a large body is handed to its transport this much at a time


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


async def pipe(body: BodyStream, transport: asyncio.Transport, can_write: asyncio.Event) -> bool:
    """Write a streamed body on as it arrives, at the pace the transport's peer reads it.
    False (and the body's producer stopped) when the transport closed first; raises
    StreamError when the body's producer went away."""
    async for chunk in body.chunks():
        if transport.is_closing():
            body.cancel("the connection it was written to closed")
            return False
        transport.write(chunk)
        if not can_write.is_set():
            await can_write.wait()
    return True


class StreamError(ConnectionError):
    """The body's producer went away (or a consumer gave up) before the body was complete."""


class BodyStream:
    """A body of known `length` arriving in chunks; read it once with `chunks()`."""

    def __init__(
        self,
        length: int,
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

    def __len__(self) -> int:
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
        if self._received != self.length and self._error is None:
            self.fail(StreamError(f"body ended at {self._received} of {self.length} bytes"))
            return
        self._done = True
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._error = error
        self._chunks.clear()
        self._wake.set()

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
