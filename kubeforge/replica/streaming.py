"""A streaming endpoint's run on a replica: its generator's items, framed
(kubeforge/streams.py), fed to the answer's body as they are yielded.

The generator is pulled only while the caller keeps up: the body pauses it above a few MiB
unread, so a slow reader slows the actor and memory stays bounded. A caller that goes away
cancels it (the connection's loss cancels the body, the body cancels this task), and the
generator is closed: an async one sees CancelledError or GeneratorExit where it waits, and its
`finally` blocks run. Deadlines: the call's timeout bounds the whole stream, the idle timeout
each wait for the next item.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubeforge import streams, wire
from kubeforge.actor import EndpointInfo
from kubeforge.errors import (
    InvalidArgumentsError,
    KubeforgeError,
    RemoteError,
    RequestTimeoutError,
)
from kubeforge.http.server import ONE_BUFFER
from kubeforge.http.stream import BodyStream


@dataclass(slots=True)
class Call:
    """A call the replica has admitted: what it runs, with what, under which limits."""

    info: EndpointInfo
    args: list[Any]
    kwargs: dict[str, Any]
    fmt: str
    timeout: float
    all_ranks: bool
    sid: str | None
    started: float
    sse: bool = False  # a stream's items as Server-Sent Events (JSON), for curl and browsers


def encode_result(value: Any, name: str, fmt: str) -> Any:
    """A value an endpoint returned (or yielded) in the call's format, or the error that says
    why it cannot be sent."""
    try:
        return wire.encode_as(value, fmt)
    except (TypeError, ValueError, OverflowError) as exc:
        hint = ""
        if fmt == wire.FMT_JSON:
            hint = f" (send Content-Type: {wire.BINARY.decode()} for bytes, arrays and tensors)"
        raise RemoteError(
            "TypeError",
            f"{name} returned a value that cannot be sent as {wire.FORMAT_NAMES[fmt]}: {exc}{hint}",
        ) from None


def remote(exc: BaseException) -> RemoteError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RemoteError(type(exc).__name__, str(exc), tb)


_STOP = object()


def _next_or_stop(gen: Any) -> Any:
    """next() for a worker thread: StopIteration cannot cross a future."""
    try:
        return next(gen)
    except StopIteration:
        return _STOP


class Items:
    """One interface over async and sync generators; a sync one steps in a worker thread, so
    a slow step cannot stall the replica's health checks."""

    def __init__(self, gen: Any, is_async: bool) -> None:
        self.gen = gen
        self.is_async = is_async
        self._step: asyncio.Future[Any] | None = None

    async def next(self) -> Any:
        if self.is_async:
            return await self.gen.__anext__()
        run = contextvars.copy_context().run
        self._step = asyncio.get_running_loop().run_in_executor(None, run, _next_or_stop, self.gen)
        item = await asyncio.shield(self._step)  # a thread cannot be cancelled
        if item is _STOP:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self.is_async:
            await self.gen.aclose()
        elif self._step is not None and not self._step.done():  # close once its step returns
            self._step.add_done_callback(lambda _f: self.gen.close())
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.gen.close)


def local_items(fn: Callable[..., Any], call: Call) -> Callable[[], Awaitable[Items]]:
    """The generator of a replica of one process, made when the stream starts."""

    async def open_items() -> Items:
        try:
            return Items(fn(*call.args, **call.kwargs), call.info.is_async)
        except TypeError as exc:  # binding happens at call time, before the body runs
            raise InvalidArgumentsError(f"TypeError: {exc}") from None

    return open_items


class ItemStream:
    """The producer side of one streaming call. `start()` resolves when the answer's head
    can go: to None once the first item (or the end) is fed, or to the error a call would
    answer with when the generator failed before yielding anything."""

    def __init__(
        self,
        open_items: Callable[[], Awaitable[Any]],
        call: Call,
        idle_timeout: float,
        done: Callable[[bool], Any],
    ) -> None:
        self.open_items = open_items  # -> Items (or an SPMD replica's, stepped on every rank)
        self.call = call
        self.idle_timeout = idle_timeout
        self.done = done
        self.body = BodyStream(None, self._pause, self._room_set, self._cancel)
        self._room = asyncio.Event()
        self._room.set()
        self._head: asyncio.Future[KubeforgeError | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.items = 0

    def start(self, context: contextvars.Context) -> asyncio.Future[KubeforgeError | None]:
        loop = asyncio.get_running_loop()
        self._head = loop.create_future()
        self._task = loop.create_task(self._produce(), context=context)
        return self._head

    def _pause(self) -> None:
        self._room.clear()

    def _room_set(self) -> None:
        self._room.set()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _feed(self, kind: int, payload: Any = b"") -> None:
        if self.call.sse:  # JSON: one line
            self.body.feed(streams.sse_event(kind, payload))
            return
        parts = streams.frame(kind, payload)
        if sum(memoryview(p).nbytes for p in parts) < ONE_BUFFER:
            self.body.feed(b"".join(parts))
        else:  # a large item's own buffers: never joined
            for part in parts:
                self.body.feed(memoryview(part).cast("B"))

    def _opened(self) -> bool:
        head = self._head
        assert head is not None
        if not head.done():
            head.set_result(None)
            return True
        return False

    async def _produce(self) -> None:
        call = self.call
        name = call.info.name
        deadline = call.started + call.timeout
        ok = False
        items: Items | None = None
        try:
            opening = asyncio.timeout(deadline - time.monotonic())
            try:
                async with opening:
                    items = await self.open_items()
            except TimeoutError:
                if not opening.expired():
                    raise
                raise RequestTimeoutError(
                    f"endpoint {name!r} did not start its stream within {call.timeout:g}s "
                    "(the calls before it on this SPMD replica took that long)",
                    timeout=call.timeout,
                ) from None
            while True:
                left = deadline - time.monotonic()
                idle = self.items > 0 and self.idle_timeout < left
                limit = asyncio.timeout(min(left, self.idle_timeout) if idle else left)
                try:
                    async with limit:
                        item = await items.next()
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    if not limit.expired():
                        raise remote(exc) from None  # the endpoint's own TimeoutError
                    if idle:
                        raise RequestTimeoutError(
                            f"endpoint {name!r} yielded no item for {self.idle_timeout:g}s "
                            f"after item {self.items}",
                            timeout=self.idle_timeout,
                        ) from None
                    raise RequestTimeoutError(
                        f"endpoint {name!r} did not finish its stream within {call.timeout:g}s",
                        timeout=call.timeout,
                    ) from None
                self._feed(streams.ITEM, encode_result(item, name, call.fmt))
                self.items += 1
                self._opened()
                await self._room.wait()  # the caller is behind: pull nothing more for now
            self._opened()
            self._feed(streams.END)
            ok = True
        except asyncio.CancelledError:
            pass  # the caller went away: nobody reads on
        except Exception as exc:
            err = exc if isinstance(exc, KubeforgeError) and not exc.retryable else remote(exc)
            assert self._head is not None
            if not self._head.done():
                self._head.set_result(err)  # answered as a call's error
            else:
                self._feed(streams.ERROR, wire.error_body(err, call.fmt == wire.FMT_MSGPACK))
        finally:
            if items is not None:
                await items.close()
            if self._head is not None and not self._head.done():  # cancelled before its head
                self._head.set_result(KubeforgeError(f"the stream of {name!r} was cancelled"))
            self.body.end()
            self.done(ok)
