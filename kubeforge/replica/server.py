"""The replica server: hosts one actor instance and serves DESIGN §4 over the lean HTTP layer.

Everything here is a translation between HTTP and the actor; the rules (admission, session
bookkeeping, time windows) live in small classes beside it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge import argcheck, openapi, prom, streams, values, wire
from kubeforge.actor import SESSION, endpoints_of
from kubeforge.contract import HEALTHZ, READYZ
from kubeforge.errors import (
    BadRequestError,
    DrainingError,
    InvalidArgumentsError,
    KubeforgeError,
    OverloadedError,
    RemoteError,
    RequestTimeoutError,
    UnknownEndpointError,
    UnknownSessionError,
)
from kubeforge.http.server import HttpServer, Request, Response
from kubeforge.http.shm import SharedMemory
from kubeforge.metrics import Histogram
from kubeforge.replica import eager
from kubeforge.replica.admission import Admission
from kubeforge.replica.batching import Batcher
from kubeforge.replica.gang import (
    EXIT_RANK_LOST,
    FRAME_SLACK,
    Gang,
    invoke,
    rank_results,
)
from kubeforge.replica.gang_stream import GangItems
from kubeforge.replica.streaming import Call as _Call
from kubeforge.replica.streaming import ItemStream, encode_result, local_items, remote
from kubeforge.settings import DEFAULTS
from kubeforge.tls import server_context
from kubeforge.tokens import Tokens

log = logging.getLogger("kubeforge.replica")

_ENDED_MEMORY = 10_000  # ended session ids remembered, to say "ended" rather than "unknown"


@dataclass
class ReplicaConfig:
    actor: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = DEFAULTS.replica_port
    name: str = ""
    max_concurrent_requests: int = DEFAULTS.max_concurrent_requests
    max_queued_requests: int = DEFAULTS.max_queued_requests
    request_timeout: float = DEFAULTS.request_timeout
    stream_idle_timeout: float = DEFAULTS.stream_idle_timeout
    session_ttl: float = DEFAULTS.session_ttl
    drain_grace: float = DEFAULTS.drain_grace
    max_body: int = DEFAULTS.max_body
    tokens: Tokens = field(default_factory=Tokens)  # what it accepts; reloadable
    tls: Path | None = None  # the mounted `<name>-tls` Secret: serve TLS (kubeforge.tls)
    world_size: int = 1  # ranks of an SPMD replica; this server is rank 0 of them
    share_memory: bool = False  # lend and borrow large bodies (callers on this host only)
    gang_port: int = DEFAULTS.gang_port


class Sessions:
    """Live sessions of this replica with their last activity; ended ones are remembered."""

    def __init__(self) -> None:
        self.live: dict[str, float] = {}
        self.busy: dict[str, int] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()

    def register(self, sid: str, now: float) -> None:
        self.ended.pop(sid, None)
        self.live[sid] = now

    def touch(self, sid: str, now: float) -> None:
        if sid not in self.live:
            reason = self.ended.get(sid)
            if reason:
                raise UnknownSessionError(f"session {sid!r} has ended ({reason})", session_id=sid)
            raise UnknownSessionError(
                f"session {sid!r} is not known to this replica", session_id=sid
            )
        self.live[sid] = now

    def end(self, sid: str, reason: str) -> bool:
        if self.live.pop(sid, None) is None:
            return False
        self.ended[sid] = reason
        while len(self.ended) > _ENDED_MEMORY:
            self.ended.popitem(last=False)
        return True

    def idle_since(self, cutoff: float) -> list[str]:
        return [s for s, t in self.live.items() if t < cutoff and not self.busy.get(s)]


class ReplicaServer:
    def __init__(self, config: ReplicaConfig, actor_cls: type) -> None:
        self.config = config
        self.actor_cls = actor_cls
        self.endpoints = endpoints_of(actor_cls)
        # Per endpoint: the classes its calls may carry (its type hints name them), and the
        # check of a call's arguments against those hints.
        self.allowed = {n: values.Allowed.from_hints(getattr(actor_cls, n)) for n in self.endpoints}
        self.checks = {
            n: argcheck.checker(n, getattr(actor_cls, n), e.signature, e.batch is not None)
            for n, e in self.endpoints.items()
        }
        self.batchers: dict[str, Batcher] = {}  # batched endpoints, once the actor exists
        self.actor: Any = None
        self.instance = secrets.token_hex(4)
        self.name = config.name or f"{config.host}:{config.port}"
        self.ready = False
        self.draining = False
        self.admission = Admission(config.max_concurrent_requests, config.max_queued_requests)
        self.sessions = Sessions()
        self.durations = Histogram()
        self.counts: dict[tuple[str, str], int] = {}
        self.http = HttpServer(self.handle, config.max_body, on_error=wire.http_error)
        # Large bodies lent through shared memory, with a local Service (--share-memory).
        self.shm = SharedMemory(config.max_body) if config.share_memory else None
        self.tokens = config.tokens
        self._tasks: set[asyncio.Task[Any]] = set()
        self._openapi = wire.encode(openapi.document("kubeforge replica", self.endpoints, False))
        self.gang: Gang | None = None
        self.tls: ssl.SSLContext | None = None  # what it serves with, renewals loaded into it
        if config.world_size > 1:
            self.gang = Gang(
                config.world_size,
                config.actor,
                lambda token: self.tokens.accepts_token(token),
                _rank_lost,
                max_frame=config.max_body + FRAME_SLACK,
            )

    def use(self, tokens: Tokens) -> None:
        """Accept these tokens from now on (a rotation; see `kubeforge.tokens`)."""
        self.tokens = tokens

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind first (so probes answer and say 'not ready'), then build the actor."""
        self.tls = None if self.config.tls is None else server_context(self.config.tls)
        port = await self.http.start(self.config.host, self.config.port, self.tls)
        self.config.port = port
        if not self.config.name:
            self.name = f"{self.config.host}:{port}"
        if self.gang is not None:  # before setup(): the other ranks' setup runs alongside
            await self.gang.start(self.config.host, self.config.gang_port)
        self.actor = self.actor_cls(*self.config.args, **self.config.kwargs)
        for name, info in self.endpoints.items():
            if info.batch is not None:
                size, wait = info.batch
                fn, is_async = getattr(self.actor, name), info.is_async
                if self.gang is not None:  # the batch runs on every rank, in the one order
                    fn, is_async = functools.partial(self._batch_on_ranks, name, fn), True
                self.batchers[name] = Batcher(name, fn, is_async, size, wait, self._batch)
        await self.actor.setup()
        if self.gang is not None:
            await self._wait_for_ranks()
        self.ready = True
        self._spawn(self._expire_sessions())
        return port

    async def drain(self) -> None:
        """SIGTERM: stop taking calls, finish the running and queued ones, end sessions."""
        if self.draining:
            return
        self.draining = True
        grace = self.config.drain_grace
        log.info(
            "draining: %d running, %d queued, grace %.1fs",
            self.admission.active,
            self.admission.queued,
            grace,
        )
        # Keep accepting while draining: probes see 503 on /readyz and late calls get a
        # retryable DrainingError, which says more than a refused connection.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self.admission.active or self.admission.queued) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.admission.active or self.admission.queued:
            log.warning(
                "grace period over with %d calls still running",
                self.admission.active + self.admission.queued,
            )
        for sid in list(self.sessions.live):
            if loop.time() >= deadline:
                break
            await self._end_session(sid, "replica shut down")
        await self.http.close(grace=max(0.0, min(1.0, deadline - loop.time())))
        if self.gang is not None:
            await self.gang.close()
        for task in self._tasks:
            task.cancel()

    async def _wait_for_ranks(self) -> None:
        """Ready only once every rank has joined and finished its setup(), however long the
        other hosts' pods take to be scheduled; meanwhile the log says who is missing."""
        assert self.gang is not None
        while True:
            try:
                await asyncio.wait_for(self.gang.formed.wait(), 10.0)
                log.info("all %d ranks are ready", self.gang.world_size)
                return
            except TimeoutError:
                log.info("waiting for ranks %s to join and finish setup()", self.gang.missing())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # HTTP translation ---------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        if self.shm is None:
            return await self._route(req)
        try:
            return await self.shm.serve(req, self._route)
        except KubeforgeError as err:  # a body segment that cannot be borrowed
            return wire.error_response(err, req.headers.get(wire.H_CONTENT_TYPE))

    async def _route(self, req: Request) -> Response:
        try:
            path = req.path
            if path.startswith(wire.CALL_PREFIX) and req.method == "POST":
                return await self._call(req, path[len(wire.CALL_PREFIX) :])
            if path.startswith(wire.STREAM_PREFIX) and req.method == "POST":
                return await self._stream(req, path[len(wire.STREAM_PREFIX) :])
            if path in (HEALTHZ, "/health") and req.method == "GET":
                return Response(200, wire.encode(self.health()))
            if path == READYZ and req.method == "GET":
                ok = self._taking_calls()
                return Response(200 if ok else 503, wire.encode({"ready": ok}))
            if path == "/metrics" and req.method == "GET":
                return Response(200, self.prometheus(), prom.CONTENT_TYPE)
            if path.startswith(wire.SESSIONS_PATH + "/"):
                wire.check_token(req, self.tokens)
                return await self._session(req, path[len(wire.SESSIONS_PATH) + 1 :])
            if path == "/v1/endpoints" and req.method == "GET":
                return Response(200, wire.encode([e.describe() for e in self.endpoints.values()]))
            if path == "/openapi.json" and req.method == "GET":
                return Response(200, self._openapi)
            return wire.http_error(404, f"no route for {req.method} {path}")
        except KubeforgeError as err:
            return wire.error_response(err, req.headers.get(wire.H_CONTENT_TYPE))

    async def _session(self, req: Request, sid: str) -> Response:
        now = time.monotonic()
        if req.method == "POST":
            self.sessions.register(sid, now)
            return Response(201, wire.encode({"session_id": sid}))
        if req.method == "DELETE":
            if not await self._end_session(sid, "terminated by the caller"):
                self.sessions.touch(sid, now)  # raises UnknownSessionError with the reason
            return Response(200, wire.encode({"session_id": sid, "ended": True}))
        if req.method == "GET":  # a router asking where a caller-named session lives
            if sid not in self.sessions.live:
                self.sessions.touch(sid, now)  # raises UnknownSessionError with the reason
            return Response(200, wire.encode({"session_id": sid, "live": True}))
        return wire.http_error(405, f"{req.method} not allowed on sessions")

    async def _end_session(self, sid: str, reason: str) -> bool:
        if not self.sessions.end(sid, reason):
            return False
        log.info("session %s ended: %s", sid, reason)
        try:
            if self.gang is None:
                await self.actor.on_session_end(sid)
            else:  # every rank frees its share, in the order of the calls
                outcomes = await self.gang.submit(
                    "end_session", {"session": sid}, lambda: self.actor.on_session_end(sid)
                )
                rank_results(outcomes, False)
        except Exception:
            log.exception("on_session_end(%r) raised", sid)
        return True

    def _admit(self, req: Request, name: str, streaming: bool) -> _Call:
        """What every call and stream checks first: token, state, endpoint, verb, arguments."""
        wire.check_token(req, self.tokens)
        if self.draining:
            raise DrainingError("replica is shutting down")
        info = self.endpoints.get(name)
        if info is None:
            raise UnknownEndpointError(
                f"actor {self.actor_cls.__name__} has no endpoint {name!r}; "
                f"endpoints: {sorted(self.endpoints)}"
            )
        if info.streams != streaming:
            raise BadRequestError(_wrong_verb(name, info.streams))
        if not self.ready:
            raise DrainingError("replica is still starting (setup() has not finished)")
        fmt = wire.body_format(req.headers.get(wire.H_CONTENT_TYPE))
        args, kwargs = wire.parse_call_body(req.body, fmt, self.allowed[name])
        sse = streaming and streams.SSE in req.headers.get(wire.H_ACCEPT, b"")
        if sse:
            fmt = wire.FMT_JSON  # what an event's data line holds
        self.checks[name](args, kwargs)
        if info.device is not None:
            args, kwargs = values.to_device([args, kwargs], info.device)
        timeout = self.config.request_timeout
        asked = req.headers.get(wire.H_TIMEOUT)
        if asked:
            try:
                timeout = min(timeout, float(asked))
            except ValueError:
                raise InvalidArgumentsError(
                    f"bad {wire.H_TIMEOUT.decode()} header {asked.decode('latin-1')!r}: "
                    "seconds expected"
                ) from None
        sid_raw = req.headers.get(wire.H_SESSION)
        sid = sid_raw.decode("latin-1") if sid_raw else None  # any byte: at worst unknown
        call = _Call(
            info,
            args,
            kwargs,
            fmt,
            timeout,
            req.headers.get(wire.H_RANKS) == wire.ALL_RANKS,
            sid,
            time.monotonic(),
            sse,
        )
        if sid is not None:
            self.sessions.touch(sid, call.started)
            self.sessions.busy[sid] = self.sessions.busy.get(sid, 0) + 1
        return call

    def _done(self, call: _Call, ok: bool) -> None:
        """A call or stream is over: its duration, its outcome, its session's last activity."""
        now = time.monotonic()
        self.durations.observe(now - call.started)
        key = (call.info.name, "ok" if ok else "error")
        self.counts[key] = self.counts.get(key, 0) + 1
        sid = call.sid
        if sid is not None:
            left = self.sessions.busy.pop(sid, 1) - 1
            if left:
                self.sessions.busy[sid] = left
            if sid in self.sessions.live:
                self.sessions.live[sid] = now

    async def _call(self, req: Request, name: str) -> Response:
        call = self._admit(req, name, streaming=False)
        ok = False
        session = SESSION.set(call.sid)
        try:
            info, fmt = call.info, call.fmt
            if info.batch is not None:
                result = await self._batched(call)  # SPMD: every rank's, in rank order
                if self.gang is None:
                    result = [result] if call.all_ranks else result
                elif not call.all_ranks:
                    result = result[0]
            elif self.gang is None:
                result = await self._run(
                    name, info.is_async, call.args, call.kwargs, call.timeout, call.started
                )
                result = [result] if call.all_ranks else result  # every rank's: here, the one
            else:
                result = await self._run_ranks(
                    name,
                    req.body,
                    fmt,
                    call.all_ranks,
                    call.args,
                    call.kwargs,
                    call.timeout,
                    call.started,
                )
            body = encode_result({"result": result}, name, fmt)
            ok = True
            return Response(200, body, wire.content_type(fmt))
        finally:
            SESSION.reset(session)
            self._done(call, ok)

    async def _batched(self, call: _Call) -> Any:
        """A call that joins its endpoint's next batch, within its own deadline (the batch
        runs on if the caller gives up)."""
        name = call.info.name
        batcher = self.batchers[name]
        if batcher.waiting >= self.config.max_queued_requests + batcher.size:
            raise OverloadedError(
                f"replica is at capacity: {batcher.waiting} calls wait for a batch of {name!r} "
                f"(max_queued_requests={self.config.max_queued_requests})"
            )
        args, kwargs = _by_name(call.info.signature, call.args, call.kwargs)
        limit = asyncio.timeout(call.timeout - (time.monotonic() - call.started))
        try:
            async with limit:
                return await batcher.submit(args, kwargs)
        except TimeoutError:
            if not limit.expired():
                raise
            raise RequestTimeoutError(
                f"endpoint {name!r} did not finish within {call.timeout:g}s (batched)",
                timeout=call.timeout,
            ) from None

    async def _batch_on_ranks(
        self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> list[Any]:
        """An SPMD replica's batch: the method runs on every rank with the same lists (sent in
        the binary format), and each call's result is every rank's, in rank order."""
        assert self.gang is not None
        body = wire.call_body(args, kwargs, wire.FMT_BINARY).tobytes()
        fields = {"endpoint": name, "body": body, "format": wire.FMT_BINARY, "all": True}
        info = self.endpoints[name]
        work = self.gang.submit("call", fields, lambda: invoke(fn, info.is_async, args, kwargs))
        per_rank = rank_results(await asyncio.shield(work), True, self.allowed[name])
        if not isinstance(per_rank[0], list | tuple):
            return per_rank[0]  # the batcher's own check says why that is wrong
        for rank, results in enumerate(per_rank[1:], 1):
            if not isinstance(results, list | tuple) or len(results) != len(per_rank[0]):
                raise RemoteError(
                    "TypeError",
                    f"batched endpoint {name!r} returned {len(per_rank[0])} results on rank 0 "
                    f"but not on rank {rank}: every rank must return one result per call",
                )
        return [
            own if isinstance(own, BaseException) else [own, *(r[i] for r in per_rank[1:])]
            for i, own in enumerate(per_rank[0])
        ]

    async def _batch(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """One batch: a single slot of the replica's concurrency, whatever its size."""
        await self.admission.acquire(self.config.request_timeout)  # a refusal stays retryable
        try:
            return await run()
        except KubeforgeError as exc:
            if exc.retryable:  # the method's own (a nested call's): it ran, so not a refusal
                raise remote(exc) from None
            raise
        finally:
            self.admission.release()

    async def _stream(self, req: Request, name: str) -> Response:
        """A streaming endpoint's call. The answer's head waits for the first item, so that
        whatever fails before it (arguments, a full replica, the generator's first step)
        answers as a call does, and may be sent elsewhere by the same rule; after it, items
        go out as they come, and an error ends the stream in a frame of its own."""
        call = self._admit(req, name, streaming=True)
        try:
            await self.admission.acquire(call.timeout)
        except BaseException:
            self._done(call, False)
            raise
        fn = getattr(self.actor, name)
        gang = self.gang
        run = ItemStream(
            local_items(fn, call)
            if gang is None
            else functools.partial(GangItems.open, gang, fn, call, req.body),
            call,
            self.config.stream_idle_timeout,
            lambda ok: (self.admission.release(), self._done(call, ok)),
        )
        context = contextvars.copy_context()
        context.run(SESSION.set, call.sid)  # current_session() in the generator too
        head = await run.start(context)
        if head is not None:
            raise head
        kind = streams.SSE if call.sse else streams.content_type(wire.content_type(call.fmt))
        return Response(200, run.body, kind, [(b"cache-control", b"no-cache")])

    async def _run(
        self,
        name: str,
        is_async: bool,
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float,
        started: float,
    ) -> Any:
        fn = getattr(self.actor, name)
        if not self.admission.try_acquire():  # a free slot is taken with no coroutine made
            await self.admission.acquire(timeout)
        if is_async:
            try:
                coro = fn(*args, **kwargs)
            except TypeError as exc:  # binding happens at call time, before the body runs
                self.admission.release()
                raise InvalidArgumentsError(f"TypeError: {exc}") from None
        deadline = None
        try:
            if is_async:
                step = eager.first_step(coro)
                if step.done:  # it never waited: no deadline to arm
                    return step.value
                work: Awaitable[Any] = step
            else:
                # A thread cannot be cancelled: on timeout the caller gets its error at once,
                # while the slot stays taken until the thread really returns.
                run = contextvars.copy_context().run  # current_session() in the thread too
                thread = asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(run, fn, *args, **kwargs)
                )
                thread.add_done_callback(lambda _f: self.admission.release())
                work = asyncio.shield(thread)
            deadline = asyncio.timeout(timeout - (time.monotonic() - started))
            async with deadline:
                return await work
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():
                raise remote(exc) from None  # the endpoint's own TimeoutError
            raise RequestTimeoutError(
                f"endpoint {name!r} did not finish within {timeout:g}s", timeout=timeout
            ) from None
        except KubeforgeError as exc:
            if exc.retryable:  # the endpoint's own (a nested call's): it ran, so not a refusal
                raise remote(exc) from None
            raise
        except Exception as exc:
            raise remote(exc) from None
        finally:
            if is_async:
                self.admission.release()

    async def _run_ranks(
        self,
        name: str,
        body: Any,
        fmt: str,
        all_ranks: bool,
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float,
        started: float,
    ) -> Any:
        """An SPMD replica's call: admitted here, then run on every rank in one order."""
        assert self.gang is not None
        info = self.endpoints[name]  # its arguments were checked before it takes a place in
        await self.admission.acquire(timeout)  # the order that every rank must run
        fn = getattr(self.actor, name)
        work = self.gang.submit(
            "call",
            {
                "endpoint": name,
                "body": body,
                "format": fmt,
                "all": all_ranks,
                "session": SESSION.get(),
            },
            lambda: invoke(fn, info.is_async, args, kwargs),
        )
        # The slot stays taken until every rank is done, as for a thread that outlives its caller.
        work.add_done_callback(lambda _t: self.admission.release())
        deadline = asyncio.timeout(timeout - (time.monotonic() - started))
        try:
            async with deadline:
                outcomes = await asyncio.shield(work)
        except TimeoutError:
            raise RequestTimeoutError(
                f"endpoint {name!r} did not finish on all {self.gang.world_size} ranks within "
                f"{timeout:g}s",
                timeout=timeout,
            ) from None
        return rank_results(outcomes, all_ranks, self.allowed[name])

    def _taking_calls(self) -> bool:
        """Ready, not draining, and (SPMD) every rank heard from lately: a rank that stops
        answering takes the replica out of rotation until it answers again."""
        ok = self.ready and not self.draining
        return ok and (self.gang is None or not self.gang.silent(time.monotonic()))

    async def _expire_sessions(self) -> None:
        ttl = self.config.session_ttl
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.05), 5.0))
            for sid in self.sessions.idle_since(time.monotonic() - ttl):
                await self._end_session(sid, f"idle for more than {ttl:g}s")

    # reports ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "name": self.name,
            "instance": self.instance,
            "ready": self._taking_calls(),
            "draining": self.draining,
            "in_flight": self.admission.active,
            "queued": self.admission.queued,
            "sessions": len(self.sessions.live),
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "pid": os.getpid(),
            "token_digest": self.tokens.digest,
            **({} if self.gang is None else {"ranks": self._ranks()}),
            **(
                {"batches": {n: b.report() for n, b in self.batchers.items()}}
                if self.batchers
                else {}
            ),
        }

    def _ranks(self) -> list[dict[str, Any]]:
        assert self.gang is not None
        own = {"rank": 0, "pid": os.getpid(), "host": socket.gethostname(), "ready": self.ready}
        return [own, *self.gang.describe(time.monotonic())]

    def prometheus(self) -> bytes:
        exp = prom.Exposition()
        exp.family(
            "kubeforge_replica_requests_total",
            "counter",
            "Calls handled, by endpoint and outcome",
            [({"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(self.counts.items())],
        )
        exp.histogram(
            "kubeforge_replica_request_duration_seconds",
            "Call latency at the replica, queue wait included",
            [({}, self.durations)],
        )
        exp.one("kubeforge_replica_in_flight", "gauge", "Calls running now", self.admission.active)
        exp.one(
            "kubeforge_replica_queue_depth",
            "gauge",
            "Calls waiting for a slot",
            self.admission.queued,
        )
        exp.histogram(
            "kubeforge_replica_batch_size",
            "Calls per batch of each batched endpoint",
            [({"endpoint": n}, b.sizes) for n, b in sorted(self.batchers.items())],
        )
        exp.one("kubeforge_replica_sessions", "gauge", "Live sessions", len(self.sessions.live))
        exp.one(
            "kubeforge_replica_ready", "gauge", "1 when taking calls", int(self._taking_calls())
        )
        return exp.render()


def _rank_lost(why: str) -> None:
    """A rank of this replica is gone: its peers may be stuck in a collective with it, so
    nothing here can recover. Exit at once; the launcher restarts every rank together, and
    the router sees the replica go (sessions re-pinned, calls re-sent as for any lost one)."""
    log.error("%s; stopping every rank of this replica so they restart together", why)
    logging.shutdown()
    os._exit(EXIT_RANK_LOST)


def _by_name(
    signature: inspect.Signature, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """A call's arguments all by name, defaults filled in: calls that pass them differently
    (positionally, by name, or not at all) still make one batch. (The check before this bound
    them already.) Signatures with *args or **kwargs keep them as they came."""
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return args, kwargs
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return [], dict(bound.arguments)


def _wrong_verb(name: str, streaming: bool) -> str:
    """The 400 for a call with the other verb: which one the endpoint takes."""
    if streaming:
        return (
            f"endpoint {name!r} streams (it is a generator): call it with POST "
            f"{wire.STREAM_PREFIX}{name} (`.stream()` in Python), not {wire.CALL_PREFIX}{name}"
        )
    return (
        f"endpoint {name!r} does not stream (it returns one value): call it with POST "
        f"{wire.CALL_PREFIX}{name} (`.route()` in Python), not {wire.STREAM_PREFIX}{name}"
    )
