"""The ranks of an SPMD replica: rank 0 hands every call to every rank, in one order.

Rank 0 serves the replica's HTTP port like any replica. The other ranks connect to it over TCP
(`--gang-port`, on MASTER_ADDR) and receive each call as a frame with a sequence number; every
rank, rank 0 included, runs the calls strictly one after another in that order. Collectives
inside endpoints therefore meet in the same order on every rank and cannot deadlock, whatever
max_concurrent_requests says (it bounds the calls admitted into the order, as Monarch's actors
take one message at a time).

Frames are an 8-byte length and a msgpack map; the actor's arguments travel as the call's own
body bytes, so nothing is decoded twice on rank 0 and nothing is ever unpickled. A rank
connection that closes means a lost rank: rank 0 then exits so that its launcher restarts the
whole replica (collectives cannot recover from a missing peer).

A streaming call holds the order from its opening to its close: a `stream` frame makes the
generator on every rank, each `step` frame advances every rank's by one item, and `close` ends
them (rank 0's side is gang_stream.py, the other ranks' `RankStream`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import socket
import struct
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kubeforge import values, wire
from kubeforge.actor import SESSION, endpoints_of
from kubeforge.errors import RemoteError
from kubeforge.replica.streaming import Items, remote
from kubeforge.settings import DEFAULTS

log = logging.getLogger("kubeforge.replica.gang")

_LENGTH = struct.Struct(">Q")  # a frame may carry a call body of up to 8 GiB
BEAT_EVERY = 0.5  # seconds between a rank's heartbeats
FRAME_SLACK = 65536  # a frame may exceed the call body limit by this much (its other fields)
# Exit statuses of rank processes that the launcher reads (away from 1, 2 and 128+N).
EXIT_SETUP_FAILED = 85  # the actor's constructor or setup() raised
EXIT_RANK_LOST = 86  # a peer rank went away: the replica must restart as a unit

Outcome = tuple[bool, Any]  # (True, value) or (False, exception on rank 0 / error dict)


class EncodedValue(bytes):
    """A rank's result in the binary format, which rank 0 decodes with the endpoint's classes."""


class GangError(RuntimeError):
    """A rank connection that breaks the protocol, or a hello rank 0 refuses."""


def pack(message: dict[str, Any]) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


async def read(reader: asyncio.StreamReader, limit: int) -> dict[str, Any]:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > limit:
        raise GangError(f"frame of {size} bytes is over the limit of {limit}")
    message = msgpack.unpackb(await reader.readexactly(size), raw=False)
    if not isinstance(message, dict):
        raise GangError("frame is not a map")
    return message


def error_of(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


async def invoke(fn: Callable[..., Any], is_async: bool, args: list[Any], kw: dict) -> Any:
    """Run an endpoint: a coroutine on the loop, a plain function on a worker thread (in this
    context, so that `current_session()` answers there too)."""
    if is_async:
        return await fn(*args, **kw)
    run = contextvars.copy_context().run
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(run, fn, *args, **kw)
    )


@dataclass
class _Link:
    rank: int
    writer: asyncio.StreamWriter
    pid: int
    host: str
    ready: bool = False
    last_seen: float = field(default_factory=time.monotonic)


class Gang:
    """Rank 0's side: the other ranks' connections, and the one order of calls."""

    def __init__(
        self,
        world_size: int,
        actor: str,
        accepts: Callable[[str | None], bool],
        on_lost: Callable[[str], None],
        max_frame: int = DEFAULTS.max_body + FRAME_SLACK,
    ) -> None:
        self.world_size = world_size
        self.actor = actor
        self.accepts = accepts  # the token check, which follows a rotation
        self.on_lost = on_lost
        self.max_frame = max_frame
        self.links: dict[int, _Link] = {}
        self.formed = asyncio.Event()  # every rank connected and through its setup()
        self.closing = False
        self._next_seq = 0
        self._waiting: dict[int, dict[int, asyncio.Future[Outcome]]] = {}
        self._tail: asyncio.Future[None] | None = None
        # Resolves once every frame that waits for its turn has gone out (see submit).
        self._gate: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return self._server.sockets[0].getsockname()[1]

    def missing(self) -> list[int]:
        """Ranks that have not joined, or not finished their setup(), yet."""
        ready = {r for r, link in self.links.items() if link.ready}
        return [r for r in range(1, self.world_size) if r not in ready]

    def silent(self, now: float, limit: float = DEFAULTS.rank_silence) -> list[int]:
        """Ranks not heard from for `limit` seconds: alive, perhaps, but not answering."""
        return [r for r, link in sorted(self.links.items()) if now - link.last_seen > limit]

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "rank": r,
                "pid": link.pid,
                "host": link.host,
                "ready": link.ready,
                "last_seen_s": round(now - link.last_seen, 3),
            }
            for r, link in sorted(self.links.items())
        ]

    # calls --------------------------------------------------------------------------------

    def submit(
        self, kind: str, fields: dict[str, Any], local: Callable[[], Awaitable[Any]]
    ) -> asyncio.Task[list[Outcome]]:
        """Give the next place in the order to one call: every rank gets it and runs it after
        the calls before it; `local` is rank 0's own share. Once submitted, a call runs on every
        rank even if its caller stops waiting: skipping it on some ranks only would break the
        order. The frame goes out at once, so that the other ranks can start early, unless a
        stream holds the order or waits for it: then at the call's turn, so that no call slips
        between a stream's steps on the other ranks."""
        loop = asyncio.get_running_loop()
        before, mine = self._tail, loop.create_future()
        self._tail = mine
        sent = None
        if self._gate is None or self._gate.done():
            sent = self._send(kind, fields)
        else:  # frames go out in the order of turns: later calls wait for this one's
            self._gate = loop.create_future()
        return loop.create_task(self._complete(kind, fields, before, mine, local, sent, self._gate))

    async def _complete(
        self,
        kind: str,
        fields: dict[str, Any],
        before: asyncio.Future[None] | None,
        mine: asyncio.Future[None],
        local: Callable[[], Awaitable[Any]],
        sent: tuple[int, dict[int, asyncio.Future[Outcome]]] | None,
        gate: asyncio.Future[None] | None,
    ) -> list[Outcome]:
        try:
            if before is not None:
                await before
            if sent is None:
                sent = self._send(kind, fields)
                if gate is not None and not gate.done():
                    gate.set_result(None)
            try:
                own: Outcome = (True, await local())
            except Exception as exc:
                own = (False, exc)
        finally:
            mine.set_result(None)
        return [own, *await self._gather(*sent)]

    async def take_turn(self) -> Callable[[], None]:
        """The order to oneself until the returned function is called: a stream holds it from
        its opening to its close, so that no call runs between its steps on any rank. A caller
        that stops waiting passes its place on when its turn comes."""
        loop = asyncio.get_running_loop()
        before, mine = self._tail, loop.create_future()
        self._tail = self._gate = mine

        def release(_: object = None) -> None:
            if not mine.done():
                mine.set_result(None)

        if before is not None:
            try:
                await asyncio.shield(before)
            except asyncio.CancelledError:
                before.add_done_callback(release)
                raise
        return release

    async def exchange(self, kind: str, fields: dict[str, Any]) -> list[Outcome]:
        """One frame to every other rank and their outcomes in rank order, for the holder of
        the turn."""
        seq, waiting = self._send(kind, fields)
        return await self._gather(seq, waiting)

    def _send(
        self, kind: str, fields: dict[str, Any]
    ) -> tuple[int, dict[int, asyncio.Future[Outcome]]]:
        loop = asyncio.get_running_loop()
        seq = self._next_seq
        self._next_seq += 1
        waiting = {r: loop.create_future() for r in self.links}
        self._waiting[seq] = waiting
        frame = pack({"t": kind, "seq": seq, **fields})
        for link in self.links.values():
            link.writer.write(frame)
        return seq, waiting

    async def _gather(self, seq: int, waiting: dict[int, asyncio.Future[Outcome]]) -> list[Outcome]:
        try:
            return [await waiting[r] for r in sorted(waiting)]
        finally:
            self._waiting.pop(seq, None)

    # connections --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link: _Link | None = None
        try:
            hello = await asyncio.wait_for(read(reader, 4096), DEFAULTS.health_timeout)
            link = self._admit(hello, writer)
            writer.write(pack({"t": "welcome"}))
            while True:
                message = await read(reader, self.max_frame)
                link.last_seen = time.monotonic()
                kind = message.get("t")
                if kind == "result":
                    fut = self._waiting.get(message["seq"], {}).get(link.rank)
                    if fut is not None and not fut.done():
                        ok = bool(message.get("ok"))
                        value = message.get("value" if ok else "error")
                        if ok and message.get("encoded"):
                            value = EncodedValue(value)
                        fut.set_result((ok, value))
                elif kind == "ready":
                    link.ready = True
                    log.info("rank %d (pid %d on %s) is ready", link.rank, link.pid, link.host)
                    if not self.missing():
                        self.formed.set()
        except GangError as exc:
            if link is None:
                log.warning("refused a rank connection: %s", exc)
                writer.write(pack({"t": "refused", "reason": str(exc)}))
            elif not self.closing:  # a member that breaks the protocol is as good as lost
                self.on_lost(f"rank {link.rank} (pid {link.pid} on {link.host}): {exc}")
        except asyncio.CancelledError:
            pass  # shutdown; returning (not raising) keeps Python 3.11's streams quiet
        except (asyncio.IncompleteReadError, OSError, TimeoutError, ValueError) as exc:
            if link is not None and not self.closing:
                self.on_lost(
                    f"rank {link.rank} (pid {link.pid} on {link.host}) went away "
                    f"({type(exc).__name__})"
                )
        finally:
            if link is not None and self.links.get(link.rank) is link:
                del self.links[link.rank]
            writer.close()

    def _admit(self, hello: dict[str, Any], writer: asyncio.StreamWriter) -> _Link:
        if hello.get("t") != "hello":
            raise GangError("expected a hello")
        if not self.accepts(str(hello.get("token") or "") or None):
            raise GangError("wrong token")
        rank, world = hello.get("rank"), hello.get("world_size")
        if world != self.world_size or hello.get("actor") != self.actor:
            raise GangError(
                f"rank {rank} runs {hello.get('actor')} in a world of {world}; this replica "
                f"runs {self.actor} in a world of {self.world_size}"
            )
        if not isinstance(rank, int) or not 0 < rank < self.world_size:
            raise GangError(f"rank {rank!r} is not in 1..{self.world_size - 1}")
        if rank in self.links or self.formed.is_set():
            raise GangError(f"rank {rank} is already here or the replica is formed")
        link = _Link(rank, writer, int(hello.get("pid", 0)), str(hello.get("host", "")))
        self.links[rank] = link
        log.info("rank %d connected (pid %d on %s)", rank, link.pid, link.host)
        return link

    async def close(self) -> None:
        """Shutdown: the ranks see their connection end and exit."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            link.writer.close()


# the other ranks ----------------------------------------------------------------------------


@dataclass
class RankConfig:
    actor: str
    args: list[Any]
    kwargs: dict[str, Any]
    rank: int
    world_size: int
    leader: tuple[str, int]  # rank 0's gang address (MASTER_ADDR, --gang-port)
    token: str | None
    connect_timeout: float = DEFAULTS.startup_timeout
    max_frame: int = DEFAULTS.max_body + FRAME_SLACK


async def _connect(config: RankConfig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Reach rank 0, which may not be listening yet (it starts at the same time)."""
    deadline = time.monotonic() + config.connect_timeout
    pause = 0.05
    while True:
        try:
            return await asyncio.open_connection(*config.leader)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise GangError(
                    f"rank 0 at {config.leader[0]}:{config.leader[1]} did not answer within "
                    f"{config.connect_timeout:g}s: {exc}"
                ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


async def serve_rank(config: RankConfig, actor_cls: type) -> int:
    """A rank other than 0: join rank 0, build the actor, then run each call it sends, in
    order, until rank 0 goes away. Returns the process's exit status."""
    reader, writer = await _connect(config)
    writer.write(
        pack(
            {
                "t": "hello",
                "rank": config.rank,
                "world_size": config.world_size,
                "actor": config.actor,
                "token": config.token,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )
    )
    answer = await read(reader, 4096)
    if answer.get("t") != "welcome":
        log.error("rank 0 refused rank %d: %s", config.rank, answer.get("reason"))
        return EXIT_RANK_LOST
    try:
        actor = actor_cls(*config.args, **config.kwargs)
        await actor.setup()
    except Exception:
        log.exception("rank %d: the actor's constructor or setup() raised", config.rank)
        return EXIT_SETUP_FAILED
    writer.write(pack({"t": "ready"}))
    beats = asyncio.get_running_loop().create_task(_beat(writer))
    endpoints = endpoints_of(actor_cls)
    stream = RankStream()
    try:
        while True:
            message = await read(reader, config.max_frame)
            reply = pack(await _run_one(actor, endpoints, message, stream))
            if len(reply) > config.max_frame:  # rank 0 would refuse it: say why instead
                reply = pack(_too_large(message, len(reply), config.max_frame))
            writer.write(reply)
    except (asyncio.IncompleteReadError, OSError):
        log.info("rank %d: rank 0 went away; stopping", config.rank)
        return EXIT_RANK_LOST
    finally:
        beats.cancel()
        await stream.close()


async def _run_one(
    actor: Any, endpoints: dict, message: dict[str, Any], stream: RankStream
) -> dict[str, Any]:
    reply: dict[str, Any] = {"t": "result", "seq": message.get("seq")}
    try:
        kind = message.get("t")
        if kind == "end_session":
            await actor.on_session_end(message["session"])
            value = None
        elif kind in STREAM_FRAMES:
            reply["value"] = await stream.handle(kind, actor, endpoints, message)
            value = None
        else:
            info = endpoints[message["endpoint"]]
            args, kwargs = _arguments(actor, info, message)
            fn = getattr(actor, info.name)
            token = SESSION.set(message.get("session"))
            try:
                value = await invoke(fn, info.is_async, args, kwargs)
            finally:
                SESSION.reset(token)
        if message.get("all"):
            if message.get("format") == wire.FMT_BINARY:
                reply["value"] = values.encode(value).tobytes()
                reply["encoded"] = True
            else:
                msgpack.packb(value, use_bin_type=True)  # fails here, as an error of this rank
                reply["value"] = value
        reply["ok"] = True
    except Exception as exc:
        reply["ok"] = False
        reply["error"] = error_of(exc)
    return reply


def _arguments(actor: Any, info: Any, message: dict[str, Any]) -> tuple[list[Any], dict]:
    """A call's arguments from the body rank 0 received, decoded with the endpoint's classes."""
    fmt = message.get("format", wire.FMT_JSON)
    allowed = values.Allowed.from_hints(getattr(type(actor), info.name))
    args, kwargs = wire.parse_call_body(message["body"], fmt, allowed)
    if info.device is not None:
        args, kwargs = values.to_device([args, kwargs], info.device)
    return args, kwargs


STREAM_FRAMES = ("stream", "step", "close")


class RankStream:
    """The streaming call open on a rank other than 0 (one at most: a stream holds the order).
    Its generator takes one step per item of rank 0's and is closed when rank 0 closes its own,
    so collectives inside the generator meet step by step, and a caller that leaves early
    stops every rank at the same item."""

    def __init__(self) -> None:
        self.items: Items | None = None
        self.session: str | None = None

    async def handle(
        self, kind: str, actor: Any, endpoints: dict, message: dict[str, Any]
    ) -> str | None:
        if kind == "close":
            await self.close()
            return None
        if kind == "stream":
            await self.close()
            info = endpoints[message["endpoint"]]
            args, kwargs = _arguments(actor, info, message)
            self.session = message.get("session")
            self.items = Items(getattr(actor, info.name)(*args, **kwargs), info.is_async)
            return None
        if self.items is None:
            raise GangError("a step of a stream that is not open")
        token = SESSION.set(self.session)
        try:
            await self.items.next()
            return ITEM
        except StopAsyncIteration:
            return END
        finally:
            SESSION.reset(token)

    async def close(self) -> None:
        items, self.items = self.items, None
        if items is not None:
            await items.close()


ITEM, END = "item", "end"  # what a rank's step of a stream gave


def _too_large(message: dict[str, Any], size: int, limit: int) -> dict[str, Any]:
    error = ValueError(f"the result is {size} bytes, over the limit of {limit} between ranks")
    return {"t": "result", "seq": message.get("seq"), "ok": False, "error": error_of(error)}


async def _beat(writer: asyncio.StreamWriter) -> None:
    while True:
        writer.write(pack({"t": "beat"}))
        await asyncio.sleep(BEAT_EVERY)


def rank_results(
    outcomes: list[Outcome], all_ranks: bool, allowed: values.Allowed | None = None
) -> Any:
    """Rank 0's value, or every rank's in rank order; an error on any rank raises, naming it.
    Other ranks' values in the binary format are decoded here, with the endpoint's classes."""
    failed = [r for r, (ok, _) in enumerate(outcomes) if not ok]
    if not failed:
        results = [
            values.decode(bytearray(v), allowed) if isinstance(v, EncodedValue) else v
            for _, v in outcomes
        ]
        return results if all_ranks else results[0]
    first = outcomes[failed[0]][1]
    if isinstance(first, BaseException):
        err = remote(first)
        kind, message, tb = err.remote_type, err.remote_message, err.traceback
    else:
        kind, message, tb = first["type"], first["message"], first.get("traceback")
    also = ""
    if len(failed) > 1:
        also = f" (ranks {', '.join(map(str, failed))} of {len(outcomes)} failed)"
    raise RemoteError(kind, f"rank {failed[0]} of {len(outcomes)}: {message}{also}", tb)
