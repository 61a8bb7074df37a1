"""The router engine: replicas, health, and every call path, shared by all front ends.

The HTTP router server and the in-process `Service` both drive this one class, so routing,
sessions, retries and metrics have one implementation. Calls are relayed as bytes: the engine
reads the endpoint from the path and the session from a header, never decodes a call's body, and
forwards it over pooled keep-alive connections. Only broadcast, which must assemble one answer
from many, looks inside replies: JSON and msgpack ones it decodes, binary ones (arrays, tensors)
it nests whole in its answer without decoding them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from kubeforge import contract, streams, values, wire
from kubeforge.errors import (
    BadRequestError,
    KubeforgeError,
    NoHealthyReplicasError,
    ReplicaLostError,
    RequestTimeoutError,
    SessionMovedError,
    UnknownSessionError,
)
from kubeforge.http.client import (
    BodyAbandoned,
    ClientResponse,
    ConnectFailed,
    ConnectionLost,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
)
from kubeforge.http.server import HttpProtocol, Request, Response
from kubeforge.http.shm import SharedMemory
from kubeforge.http.stream import BodyStream
from kubeforge.metrics import SlidingWindow
from kubeforge.router import fanout, retry
from kubeforge.router.core import Placement, Replica, ReplicaState, RoutingTable
from kubeforge.router.discovery import Discovery, split_url
from kubeforge.router.native import NativeRelay
from kubeforge.router.retry import Outcome
from kubeforge.router.sessions import SessionCodec, check_name
from kubeforge.settings import DEFAULTS, router_request_timeout
from kubeforge.tls import ClientTls
from kubeforge.tokens import Tokens

log = logging.getLogger("kubeforge.router")

_SESSION_LINE = wire.H_SESSION + b": "
_HEALTHZ = contract.HEALTHZ.encode()
# Header values as text: any byte decodes, so a session id that is not ASCII is merely unknown.
_HEADER_TEXT = "latin-1"


@dataclass(frozen=True, slots=True)
class Failed:
    """An attempt that did not produce the call's answer: on which replica, what happened, and
    the replica's own answer when it refused the call (None when the native relay holds it)."""

    index: int
    outcome: Outcome
    detail: str = ""
    answer: Response | None = None


@dataclass(slots=True)
class _Answer:
    result: Any = None
    message: Any = None  # a binary reply, nested whole
    error: dict[str, Any] | None = None
    status: int = 200


class PassOn(Exception):
    """The caller's answer is the replica's refusal, which the native relay holds."""


def _seconds(value: bytes | None) -> float | None:
    """A caller's x-kubeforge-timeout, when it is a number (the replica refuses any other)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _outcome_of(error: UpstreamError) -> Outcome:
    if isinstance(error, ConnectFailed):
        return Outcome.CONNECT
    if isinstance(error, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(error, BodyAbandoned):
        return Outcome.ABANDONED
    return Outcome.LOST


def _unknown_session(resp: ClientResponse) -> bool:
    """The replica refused the call: its session is not live there."""
    if resp.status != 404 or len(resp.body) > 4096:
        return False
    try:
        answer = wire.decode_as(resp.body, wire.body_format(resp.headers.get(wire.H_CONTENT_TYPE)))
    except KubeforgeError:
        return False
    error = answer.get("error") if isinstance(answer, dict) else None
    return isinstance(error, dict) and error.get("type") == "UnknownSessionError"


def _session_path(session_id: str) -> bytes:
    """A session's path on its replica: a caller's name may hold `/`, `%` or spaces."""
    return f"{wire.SESSIONS_PATH}/{quote(session_id, safe='')}".encode()


def _passed_on(resp: ClientResponse) -> Response:
    """A replica's refusal as the caller gets it when it is not sent again."""
    return Response(
        resp.status,
        resp.body,
        resp.headers.get(wire.H_CONTENT_TYPE, wire.JSON),
        [(wire.H_RETRYABLE, resp.headers[wire.H_RETRYABLE])],
    )


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULTS.router_port
    health_poll_rate: float = DEFAULTS.health_poll_rate
    health_timeout: float = DEFAULTS.health_timeout
    # Upper bound on one relayed call; the replicas' own limit ends it first.
    request_timeout: float = router_request_timeout(DEFAULTS.request_timeout)
    retries: int = DEFAULTS.retries  # re-sends of a call, as `retry.decide` allows them
    retry_backoff: float = DEFAULTS.retry_backoff
    max_body: int = DEFAULTS.max_body
    tokens: Tokens = field(default_factory=Tokens)  # what it accepts and sends; reloadable
    # TLS to the replicas: the Service CA's context and the name replicas prove (kubeforge.tls).
    tls: ClientTls | None = None
    metrics_window: float = DEFAULTS.metrics_window
    # Replies larger than this stream through (the router server: contract.STREAM_BODY); None
    # receives them whole (the local Service, whose caller decodes them in place).
    stream_above: int | None = None
    # Lend large bodies to the replicas through shared memory (the local Service: one host).
    share_memory: bool = False


class Router:
    def __init__(self, config: RouterConfig, discovery: Discovery) -> None:
        self.config = config
        self.discovery = discovery
        self.table = RoutingTable(SessionCodec(config.tokens.session_key))
        self.upstreams: dict[int, Upstream] = {}
        self.retries_total = 0
        # The Service resource's spec.replicas when the router follows one (for /metrics:
        # replicas against desired); else the replicas it was given.
        self.desired_replicas: int | None = None
        self._in_flight_sum = 0  # this router's open calls, summed ten times a second
        self._in_flight_samples = 0
        self.polled_once = False
        self.tokens = config.tokens
        self._tasks: list[asyncio.Task[Any]] = []
        self.native: NativeRelay | None = None
        self.shm = SharedMemory(config.max_body) if config.share_memory else None
        self._shm_peers: dict[int, int] = {}  # replica index -> its pid, once it has answered

    def use(self, tokens: Tokens) -> None:
        """Accept and send these tokens from now on (a rotation; see `kubeforge.tokens`)."""
        self.tokens = tokens
        if self.native is not None:
            self.native.use(tokens)

    def attach(self, native: NativeRelay) -> None:
        """Let the native relay take the common calls; it follows every change of the table."""
        self.native = native
        self.table.on_change = native.push
        native.push()

    def collect(self) -> None:
        """Bring in what the native relay measured since last asked (before any report)."""
        if self.native is not None:
            self.native.collect()

    def replica_added(self, index: int, name: str, url: str) -> None:
        host, port = split_url(url)
        old = self.upstreams.pop(index, None)
        if old is not None:
            old.close()
        self.upstreams[index] = Upstream(host, port, tls=self.config.tls)
        self.table.add(
            Replica(index, name, url, SlidingWindow(time.monotonic(), self.config.metrics_window))
        )

    def replica_removed(self, index: int) -> None:
        self.table.remove(index)
        upstream = self.upstreams.pop(index, None)
        if upstream is not None:
            upstream.close()

    async def start(self) -> None:
        """Learn the replicas and check their health once, then keep checking."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.discovery.run(self)))
        await asyncio.sleep(0)
        await self.poll_all()
        self._tasks.append(loop.create_task(self._poll_forever()))
        self._tasks.append(loop.create_task(self._expire_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for upstream in self.upstreams.values():
            upstream.close()
        if self.shm is not None:
            self.shm.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_poll_rate)  # followed when it changes
            try:
                await self.poll_all()
            except Exception:  # never let one bad report stop health checking
                log.exception("health poll failed")

    async def _expire_forever(self) -> None:
        """Deadlines of relayed calls and health checks, checked ten times a second; the native
        relay's samples come in at the same pace, a few thousand at most each time."""
        while True:
            await asyncio.sleep(0.1)
            self.collect()
            self._in_flight_sum += sum(r.open_calls for r in self.table.replicas.values())
            self._in_flight_samples += 1
            now = time.monotonic()
            for upstream in list(self.upstreams.values()):
                upstream.expire(now)

    def take_in_flight(self) -> float:
        """This router's open calls, averaged since the last time it was asked: what status
        publishes and the autoscaler reads, without the instant's noise."""
        if not self._in_flight_samples:
            return float(sum(r.open_calls for r in self.table.replicas.values()))
        average = self._in_flight_sum / self._in_flight_samples
        self._in_flight_sum = self._in_flight_samples = 0
        return round(average, 1)

    async def poll_all(self) -> None:
        self.collect()  # loads reported by replicas are split into ours and others' with it
        replicas = list(self.table.replicas.values())
        await asyncio.gather(*(self._poll(r) for r in replicas))
        self.polled_once = True
        if self.native is not None:
            self.native.push()

    async def _poll(self, replica: Replica) -> None:
        upstream = self.upstreams.get(replica.index)
        if upstream is None:
            return
        try:
            lines = b""
            if self.shm is not None:  # learns its pid; segments freed either way are told
                lines, _ = await self.shm.request_headers(self._shm_peers.get(replica.index), b"")
            resp = await upstream.request(b"GET", _HEALTHZ, lines, b"", self.config.health_timeout)
            self._shm_reply(replica, resp)
            if resp.status != 200:
                raise ConnectionLost(f"{contract.HEALTHZ} answered {resp.status}")
            health = wire.decode(resp.body)
        except (
            ConnectFailed,
            ConnectionLost,
            UpstreamTimeout,
            KubeforgeError,
            TimeoutError,
        ) as exc:
            if replica.index in self.table.replicas:
                slow = isinstance(exc, UpstreamTimeout | TimeoutError)
                self.table.report(replica, None, str(exc), timed_out=slow)
            return
        if replica.index in self.table.replicas:
            self.table.report(replica, health)

    async def call(
        self,
        path: str,
        body: Any,
        headers: dict[bytes, bytes],
        failed: Failed | None = None,
        first: Replica | None = None,
        started: float | None = None,
    ) -> Response:
        """The general call path: placement of new and moved sessions, connects, re-sends.

        `headers` are the call's wire headers (lower-case names): session, content type,
        timeout, delivery, session-moved preference. `failed` is a first attempt that a relay
        (the callback relay below, or the native one) made and that failed: the call goes on
        from there exactly as if this loop had made it. `first` is where the callback relay
        already chose to send a call without a session, when it had no pooled connection there;
        `started` is when the call's first attempt began, when that was before this.
        """
        sid_raw = headers.get(wire.H_SESSION)
        path_b = path.encode()
        # One deadline for the whole call, re-sends included; the caller's own timeout, when it
        # gave one, bounds them too and travels on as what is left of it.
        started = time.monotonic() if started is None else started
        deadline = started + self.config.request_timeout
        asked = _seconds(headers.get(wire.H_TIMEOUT))
        extra = self._forwarded(headers)
        tried: set[int] = set()
        attempt = 0
        ended_on: int | None = None  # a caller-named session ended there and starts again
        while True:
            if failed is not None:
                tried.add(failed.index)
                now = time.monotonic()
                left = deadline - now
                if asked is not None:
                    left = min(left, asked - (now - started))
                replayable = not (isinstance(body, BodyStream) and body.started)
                decision = self._judge(failed, attempt, tried, headers, left, replayable)
                if not decision.resend:
                    return self._give_up(failed, decision)
                attempt += 1
                if decision.backoff:
                    await asyncio.sleep(decision.backoff * random.uniform(0.5, 1))
                if asked is not None:
                    extra = self._forwarded(headers, asked - (time.monotonic() - started))
            placement: Placement | None = None
            if sid_raw is None:
                usable = first is not None and first.state is ReplicaState.HEALTHY
                replica = first if usable else self.table.pick(frozenset(tried))  # type: ignore[assignment]
                first = None
                line = extra
            else:
                sid = sid_raw.decode(_HEADER_TEXT)
                placement = await self._place(sid, frozenset(tried))
                if ended_on is not None and placement.moved_from is None:
                    placement = dataclasses.replace(placement, moved_from=ended_on)
                replica = placement.replica
                if (
                    placement.moved_from is not None
                    and headers.get(wire.H_SESSION_MOVED, b"").lower() == b"error"
                ):
                    raise SessionMovedError(
                        f"session {sid!r} lost its replica and now lives on "
                        f"{replica.name} as {placement.session_id!r}; state kept on the old "
                        "replica is gone",
                        session_id=placement.session_id,
                        replica=replica.name,
                    )
                line = extra + _SESSION_LINE + placement.session_id.encode() + b"\r\n"
            if attempt:
                self.retries_total += 1  # counted once it really goes
            try:
                resp = await self._send(replica, path_b, line, body, deadline)
            except UpstreamError as exc:
                failed = Failed(replica.index, _outcome_of(exc), str(exc))
                continue
            refused = Outcome.of_answer(resp.status, resp.headers.get(wire.H_RETRYABLE))
            if refused is not None:
                failed = Failed(replica.index, refused, answer=_passed_on(resp))
                continue
            if (
                placement is not None
                and not placement.fresh
                and ended_on is None
                and _unknown_session(resp)
                and not self.table.codec.issued_form(placement.session_id)
                and not (isinstance(body, BodyStream) and body.started)
            ):
                # A caller-named session that ended on its replica (idle past its TTL, or
                # terminated through another router): the name starts a new session, as in
                # torchforge, and the answer says that its state is gone, as for a session
                # moved off a lost replica. The replica refused the call before its actor ran.
                self.table.forget(placement.session_id)
                ended_on = replica.index
                continue
            out = Response(resp.status, resp.body, resp.headers.get(wire.H_CONTENT_TYPE, wire.JSON))
            if placement is not None and placement.moved_from is not None:
                out.headers = [
                    (wire.H_SESSION, placement.session_id.encode()),
                    (wire.H_SESSION_MOVED_FROM, sid_raw),
                ]
            return out

    def _judge(
        self,
        failed: Failed,
        attempt: int,
        tried: set[int],
        headers: dict[bytes, bytes],
        time_left: float,
        replayable: bool = True,
    ) -> retry.Decision:
        """Take what a failed attempt says about its replica's health, then ask the one rule."""
        replica = self.table.replicas.get(failed.index)
        reason = failed.outcome.unhealthy_reason
        if replica is not None and reason is not None:
            self.table.set_state(replica, ReplicaState.UNHEALTHY, failed.detail or reason)
        return retry.decide(
            failed.outcome,
            attempt,
            self.config.retries,
            at_most_once=retry.at_most_once(headers),
            in_session=wire.H_SESSION in headers,
            others=sum(r.index not in tried for r in self.table.healthy),
            time_left=time_left,
            backoff_base=self.config.retry_backoff,
            replayable=replayable,
        )

    def _give_up(self, failed: Failed, decision: retry.Decision) -> Response:
        """The caller's answer for a call that will not be sent again.

        A replica's refusal is passed on as it is (its message says why it refused); a call
        that got no answer gets the error that says what may have happened to it.
        """
        if failed.outcome in (Outcome.OVERLOADED, Outcome.DRAINING):
            if failed.answer is None:
                raise PassOn()  # the native relay holds the replica's answer
            return failed.answer
        raise self._error(failed, decision.why)

    def _error(self, failed: Failed, why: str) -> KubeforgeError:
        replica = self.table.replicas.get(failed.index)
        name = replica.name if replica is not None else f"replica {failed.index}"
        if failed.outcome is Outcome.TIMEOUT:
            return RequestTimeoutError(
                f"{name} did not answer within {self.config.request_timeout:g}s",
                replica=name,
            )
        if failed.outcome is Outcome.ABANDONED:
            return BadRequestError(f"{failed.detail} (the call reached {name} incomplete)")
        if failed.outcome is Outcome.LOST:
            return ReplicaLostError(
                f"{name} was lost during the call ({failed.detail or 'connection lost'}); "
                f"it may or may not have run (not sent again: {why})",
                replica=name,
            )
        return NoHealthyReplicasError(
            f"the call could not be delivered: {name}: {failed.detail or failed.outcome} "
            f"(not sent again: {why})"
        )

    def _forwarded(self, headers: dict[bytes, bytes], left: float | None = None) -> bytes:
        """The header lines a call carries on to its replica: token, body type, the ranks
        whose results it wants, deadline (as the caller sent it, or what is `left` of it for a
        re-send)."""
        extra = self.tokens.line
        ctype = headers.get(wire.H_CONTENT_TYPE)
        if ctype:
            extra += b"content-type: " + ctype + b"\r\n"
        ranks = headers.get(wire.H_RANKS)
        if ranks:
            extra += wire.H_RANKS + b": " + ranks + b"\r\n"
        accept = headers.get(wire.H_ACCEPT)
        if accept and streams.SSE in accept:  # a stream's items as Server-Sent Events
            extra += wire.H_ACCEPT + b": " + streams.SSE + b"\r\n"
        asked = headers.get(wire.H_TIMEOUT) if left is None else f"{max(left, 0):.3f}".encode()
        if asked:
            extra += wire.H_TIMEOUT + b": " + asked + b"\r\n"
        return extra

    async def _send(
        self,
        replica: Replica,
        path: bytes,
        headers: bytes,
        body: Any,
        deadline: float | None = None,
        broadcast: bool = False,
    ) -> ClientResponse:
        """One relayed request, with the bookkeeping the routing core and metrics need; a
        broadcast's replies are read whole (one answer is assembled from them)."""
        upstream = self.upstreams[replica.index]
        started = time.monotonic()
        timeout = self.config.request_timeout if deadline is None else deadline - started
        replica.in_flight += 1
        ok: bool | None = False
        try:
            if self.shm is not None:
                lines, body = await self.shm.request_headers(
                    self._shm_peers.get(replica.index), body
                )
                headers += lines
            resp = await upstream.request(
                b"POST",
                path,
                headers,
                body,
                timeout,
                min(timeout, self.config.health_timeout),
                None if broadcast else self.config.stream_above,
            )
            self._shm_reply(replica, resp)
            ok = resp.status < 400
            if isinstance(resp.body, BodyStream) and resp.body.length is None:
                # A stream of items: in flight (for placement) until its last item.
                resp.body.when_finished(lambda whole: self._record(replica, started, whole))
                ok = None
            return resp
        finally:
            if ok is not None:
                self._record(replica, started, ok)

    def _shm_reply(self, replica: Replica, resp: ClientResponse) -> None:
        """A reply's body borrowed from the replica's segment, when it lent it."""
        if self.shm is not None:
            peer, resp.body = self.shm.reply(resp.headers, resp.body)
            old = self._shm_peers.get(replica.index)
            if peer is not None and peer != old:
                self._shm_peers[replica.index] = peer
                if old is not None:  # the replica restarted: what the old process lent goes
                    self.shm.replaced(old)

    def _record(self, replica: Replica, started: float, ok: bool) -> None:
        replica.in_flight -= 1
        now = time.monotonic()
        replica.record(now, now - started, ok)

    def relay(self, req: Request, conn: HttpProtocol) -> bool:
        """The common case of `call`, relayed with callbacks only, or False to take `call`.

        Taken when: a call whose session (if any) sits on its healthy replica, with the right
        token, and a pooled connection to the chosen replica. Everything else goes through
        `call`, and so does an attempt made here that failed: `call` goes on from it.
        """
        if req.method != "POST" or not req.path.startswith(wire.CALL_PREFIX):
            return False
        if isinstance(req.body, BodyStream):
            return False  # `call` streams it on
        if not wire.is_endpoint_name(req.path[len(wire.CALL_PREFIX) :]):
            return False  # `handle` refuses it: the path goes into our request line
        headers = req.headers
        if not self.tokens.allows(headers.get(wire.H_AUTH)):
            return False  # `call` answers 401
        extra = self._forwarded(headers)
        sid = headers.get(wire.H_SESSION)
        table = self.table
        try:
            if sid is None:
                replica = table.pick()
            else:
                replica = table.sticky(sid.decode(_HEADER_TEXT))
                if replica is None:
                    return False  # the session must move first
                extra += _SESSION_LINE + sid + b"\r\n"
        except KubeforgeError:
            return False
        replica.in_flight += 1
        started = time.monotonic()

        def done(resp: ClientResponse | None, error: UpstreamError | None) -> None:
            self._record(replica, started, resp is not None and resp.status < 400)
            if resp is None:
                assert error is not None
                failed = Failed(replica.index, _outcome_of(error), str(error))
            else:
                refused = Outcome.of_answer(resp.status, resp.headers.get(wire.H_RETRYABLE))
                if refused is None:
                    conn.answer(
                        req,
                        resp.raw
                        if req.keep_alive and resp.raw is not None
                        else Response(
                            resp.status, resp.body, resp.headers.get(wire.H_CONTENT_TYPE, wire.JSON)
                        ),
                    )
                    return
                failed = Failed(replica.index, refused, answer=_passed_on(resp))
            asyncio.get_running_loop().create_task(self._go_on(req, conn, failed, started=started))

        sent = self.upstreams[replica.index].send(
            b"POST",
            req.path.encode(),
            extra,
            req.body,
            self.config.request_timeout,
            done,
            self.config.stream_above,
        )
        if not sent:
            replica.in_flight -= 1
            if sid is not None:
                return False  # `call` places it on the same replica
            # No pooled connection: `call` connects to the replica chosen here, so that the
            # choice (and its place in the tie-break rotation) is made once.
            asyncio.get_running_loop().create_task(self._go_on(req, conn, first=replica))
        return True

    async def _go_on(
        self,
        req: Request,
        conn: HttpProtocol,
        failed: Failed | None = None,
        first: Replica | None = None,
        started: float | None = None,
    ) -> None:
        """Finish a call the callback relay started, answering as `call` does."""
        try:
            resp = await self.call(req.path, req.body, req.headers, failed, first, started)
        except KubeforgeError as err:
            resp = wire.error_response(err, req.headers.get(wire.H_CONTENT_TYPE))
        except Exception as exc:  # answered as the server answers a crashed handler
            conn.crashed(req, exc)
            return
        conn.answer(req, resp)

    async def resume(
        self,
        path: str,
        body: Any,
        headers: dict[bytes, bytes],
        index: int,
        took: float,
        report: str,
    ) -> Response:
        """A call the native relay sent to replica `index` that failed after `took` seconds as
        `report` says (`connect`, `lost`, `timeout` or `refused <ErrorType>`): what `call`
        does next, with the time already spent counted against the call's deadlines."""
        failed = Failed(index, Outcome.of_report(report))
        return await self.call(path, body, headers, failed, started=time.monotonic() - took)

    async def _place(self, session_id: str, exclude: frozenset[int]) -> Placement:
        """Where a session goes now; a fresh placement is registered with its replica first."""
        if not self.table.codec.issued_form(session_id):
            return await self._place_named(session_id, exclude)
        placement = (
            self.table.place(session_id)
            if not exclude
            else self.table.move(session_id, self.table.codec.parse(session_id).index, exclude)
        )
        tried = set(exclude)
        while placement.fresh:
            try:
                await self._register(placement.replica, placement.session_id)
                break
            except UpstreamError as exc:  # never reached, or no answer: try the next one
                self.table.connection_failed(placement.replica, str(exc))
                tried.add(placement.replica.index)
                placement = self.table.move(session_id, placement.moved_from or 0, frozenset(tried))
        return placement

    async def _place_named(self, name: str, exclude: frozenset[int]) -> Placement:
        """A caller-named session: where it was last placed, else where a replica says it
        lives, else a new placement (registered first, as an issued one)."""
        check_name(name)
        replica = self.table.named_replica(name)
        if replica is not None and replica.index not in exclude:
            return Placement(replica, name)
        holder = await self._holder(name, exclude)
        if holder is not None:
            self.table.learn(name, holder)
            return Placement(holder, name)
        tried = set(exclude)
        while True:
            placement = self.table.place_named(name, frozenset(tried))
            try:
                await self._register(placement.replica, name)
                return placement
            except UpstreamError as exc:
                self.table.connection_failed(placement.replica, str(exc))
                tried.add(placement.replica.index)

    async def _holder(self, name: str, exclude: frozenset[int] = frozenset()) -> Replica | None:
        """The healthy replica on which session `name` is live, asked of each in parallel:
        another router may have placed it, or this one before it restarted."""
        replicas = [r for r in self.table.healthy if r.index not in exclude]

        async def holds(replica: Replica) -> bool:
            try:
                resp = await self.upstreams[replica.index].request(
                    b"GET", _session_path(name), self.tokens.line, b"", self.config.health_timeout
                )
            except UpstreamError:
                return False
            return resp.status == 200

        found = await asyncio.gather(*(holds(r) for r in replicas))
        return next((r for r, live in zip(replicas, found, strict=True) if live), None)

    async def _register(self, replica: Replica, session_id: str) -> None:
        resp = await self.upstreams[replica.index].request(
            b"POST",
            _session_path(session_id),
            self.tokens.line,
            b"",
            self.config.health_timeout,
        )
        if resp.status >= 300:
            raise ConnectFailed(f"replica {replica.name} refused the session: {resp.status}")

    async def start_session(self) -> Response:
        tried: set[int] = set()
        while True:
            placement = self.table.new_session(frozenset(tried))
            replica, sid = placement.replica, placement.session_id
            try:
                await self._register(replica, sid)
            except (ConnectFailed, ConnectionLost, UpstreamTimeout) as exc:
                replica.sessions_added -= 1
                self.table.connection_failed(replica, str(exc))
                tried.add(replica.index)
                continue
            return Response(201, wire.encode({"session_id": sid, "replica": replica.name}))

    async def end_session(self, session_id: str) -> Response:
        issued = self.table.codec.issued_form(session_id)
        if issued:
            replica = self.table.current(session_id)
        else:
            check_name(session_id)
            replica = self.table.named_replica(session_id) or await self._holder(session_id)
        self.table.forget(session_id)
        if replica is None and not issued:
            raise UnknownSessionError(
                f"session {session_id!r} is not live on any healthy replica",
                session_id=session_id,
            )
        if replica is None or replica.state is not ReplicaState.HEALTHY:
            return Response(
                200,
                wire.encode(
                    {"session_id": session_id, "ended": True, "note": "its replica is gone"}
                ),
            )
        target = self.table.aliases.get(session_id, session_id)
        try:
            resp = await self.upstreams[replica.index].request(
                b"DELETE",
                _session_path(target),
                self.tokens.line,
                b"",
                self.config.request_timeout,
            )
        except (ConnectFailed, ConnectionLost, UpstreamTimeout) as exc:
            self.table.connection_failed(replica, str(exc))
            return Response(
                200,
                wire.encode(
                    {"session_id": session_id, "ended": True, "note": "its replica is gone"}
                ),
            )
        if resp.status < 300:
            if replica.sessions_added > 0:
                replica.sessions_added -= 1
            elif replica.sessions_reported > 0:
                replica.sessions_reported -= 1
        return Response(resp.status, resp.body)

    async def broadcast(self, endpoint: str, body: Any, asked: dict[bytes, bytes]) -> Response:
        """`asked` is the call's wire headers; what a call carries on, a broadcast does too.
        A caller that accepts a stream gets each replica's answer as it arrives instead."""
        replicas = list(self.table.healthy)
        if not replicas:
            raise NoHealthyReplicasError(self.table._no_healthy_message())
        fmt = wire.body_format(asked.get(wire.H_CONTENT_TYPE))
        headers = self._forwarded(asked)
        path = (wire.CALL_PREFIX + endpoint).encode()
        # A streamed body is read from the caller once and written to every replica at once.
        bodies = body.tee(len(replicas)) if isinstance(body, BodyStream) else [body] * len(replicas)
        sends = [
            self._send(r, path, headers, b, broadcast=True)
            for r, b in zip(replicas, bodies, strict=True)
        ]
        if streams.CONTENT_TYPE in asked.get(wire.H_ACCEPT, b""):
            return self._broadcast_stream(replicas, sends, fmt)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        answers = [
            (r.name, self._answer_of(r.index, self._part_of(r.index, outcome)))
            for r, outcome in zip(replicas, outcomes, strict=True)
        ]
        return self._assemble(answers, fmt)

    def relayed_broadcast(
        self, outcomes: list[fanout.Relayed], asked: dict[bytes, bytes]
    ) -> Response:
        """A broadcast the native relay sent and did not answer itself: answered from every
        replica's outcome as `broadcast` answers from the replies it got."""
        answers = []
        for part in outcomes:
            outcome = part.outcome
            if isinstance(outcome, str):
                outcome = Failed(part.index, Outcome.of_report(outcome))
            answers.append((part.name, self._answer_of(part.index, outcome)))
        return self._assemble(answers, wire.body_format(asked.get(wire.H_CONTENT_TYPE)))

    def _assemble(self, answers: list[tuple[str, _Answer]], fmt: str) -> Response:
        """One answer from each replica's: `{"results", "replicas", "errors"}` in `fmt`."""
        results: list[Any] = []
        errors: dict[str, Any] = {}
        statuses: set[int] = set()
        replies: list[Any] = []  # binary format: each replica's reply, relayed undecoded
        for name, answer in answers:
            if answer.error is not None:
                errors[name] = answer.error
                statuses.add(answer.status)
                results.append(None)
            elif answer.message is not None:
                results.append(values.Message(len(replies)))
                replies.append(answer.message)
            else:
                results.append(answer.result)
        if len(errors) == len(answers) and len(statuses) == 1 and 400 <= min(statuses) < 500:
            # Every replica rejected the call the same way: the caller's mistake, say it once
            # (in msgpack to a msgpack caller, else in JSON, as every error).
            packed = fmt == wire.FMT_MSGPACK
            return Response(
                statuses.pop(),
                wire.encode({"error": next(iter(errors.values()))}, packed),
                wire.MSGPACK if packed else wire.JSON,
            )
        names = [name for name, _ in answers]
        envelope = {"results": results, "replicas": names, "errors": errors}
        if fmt == wire.FMT_BINARY:
            return Response(200, values.encode(envelope, messages=replies), wire.BINARY)
        return Response(200, wire.encode_as(envelope, fmt), wire.content_type(fmt))

    @staticmethod
    def _part_of(index: int, outcome: Any) -> fanout.Reply | Failed | BaseException:
        """A reply or failure of the Python call path, as the relay's outcomes come too."""
        if isinstance(outcome, UpstreamError):
            return Failed(index, _outcome_of(outcome), str(outcome))
        if isinstance(outcome, BaseException):
            return outcome
        return fanout.Reply(outcome.status, outcome.headers.get(wire.H_CONTENT_TYPE), outcome.body)

    def _answer_of(self, index: int, outcome: fanout.Reply | Failed | BaseException) -> _Answer:
        """One replica's part of a broadcast: its result, its reply to nest whole (binary
        format), or its error with the status that goes with it."""
        if isinstance(outcome, Failed):
            self._judge(outcome, 0, {index}, {}, 0.0)  # its health, nothing more
            err: KubeforgeError = self._error(outcome, "a broadcast is sent once")
            return _Answer(error=err.to_wire(), status=err.status)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, KubeforgeError):
                err = outcome
            else:
                err = ReplicaLostError(f"{type(outcome).__name__}: {outcome}")
            return _Answer(error=err.to_wire(), status=err.status)
        reply_fmt = wire.body_format(outcome.content_type)
        if outcome.status < 300 and reply_fmt == wire.FMT_BINARY:
            return _Answer(message=outcome.body)  # {"result": ...}: the caller decodes it
        try:
            answer = wire.decode_as(outcome.body, reply_fmt)
        except KubeforgeError:
            answer = {
                "error": {
                    "type": "ReplicaLostError",
                    "message": f"unreadable reply ({outcome.status})",
                }
            }
        if outcome.status < 300:
            return _Answer(result=answer.get("result"))
        return _Answer(error=answer.get("error", answer), status=outcome.status)

    def _broadcast_stream(self, replicas: list[Replica], sends: list[Any], fmt: str) -> Response:
        """Each replica's answer as an item of its own, in the order they arrive:
        `{"replica", "index", "result" | "error"}` (a binary reply nested whole)."""
        task: asyncio.Task[None] | None = None
        # The caller left: the sends still out are dropped.
        out = BodyStream(None, cancel=lambda: task.cancel() if task is not None else None)

        async def run() -> None:
            pending = {asyncio.ensure_future(s): i for i, s in enumerate(sends)}
            try:
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        outcome = fut.exception() or fut.result()
                        self._feed_answer(out, replicas[i], i, outcome, fmt)
                out.feed(b"".join(streams.frame(streams.END)))
                out.end()
            finally:
                for fut in pending:
                    fut.cancel()

        task = asyncio.get_running_loop().create_task(run())
        return Response(200, out, streams.content_type(wire.content_type(fmt)))

    def _feed_answer(
        self, out: BodyStream, replica: Replica, index: int, outcome: Any, fmt: str
    ) -> None:
        answer = self._answer_of(replica.index, self._part_of(replica.index, outcome))
        item: dict[str, Any] = {"replica": replica.name, "index": index}
        messages = []
        if answer.error is not None:
            item["error"] = answer.error
        elif answer.message is not None:
            item["result"] = values.Message(0)
            messages = [answer.message]
        else:
            item["result"] = answer.result
        if fmt == wire.FMT_BINARY:
            payload: Any = values.encode(item, messages=messages)
        else:
            payload = wire.encode_as(item, fmt)
        for part in streams.frame(streams.ITEM, payload):
            out.feed(memoryview(part).cast("B"))
