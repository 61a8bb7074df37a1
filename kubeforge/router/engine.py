"""The router engine: replicas, health, and every call path, shared by all front ends.

The HTTP router server and the in-process `Service` both drive this one class, so routing,
sessions, retries and metrics have one implementation. Calls are relayed as bytes: the engine
reads the endpoint from the path and the session from a header, never decodes a call's body, and
forwards it over pooled keep-alive connections. Only broadcast, which must assemble one answer
from many, decodes replies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from kubeforge import wire
from kubeforge.errors import (
    KubeforgeError,
    NoHealthyReplicasError,
    ReplicaLostError,
    RequestTimeoutError,
    SessionMovedError,
)
from kubeforge.http.client import (
    ClientResponse,
    ConnectFailed,
    ConnectionLost,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
)
from kubeforge.http.server import HttpProtocol, Request, Response
from kubeforge.metrics import SlidingWindow
from kubeforge.router.core import Placement, Replica, ReplicaState, RoutingTable
from kubeforge.router.discovery import Discovery, split_url
from kubeforge.router.native import NativeRelay
from kubeforge.router.sessions import SessionCodec

log = logging.getLogger("kubeforge.router")

_MOVED_FROM = b"x-kubeforge-session-moved-from"


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    health_poll_rate: float = 0.2
    health_timeout: float = 2.0
    request_timeout: float = 120.0  # upper bound on one relayed call; replicas time out first
    retries: int = 3  # extra attempts for calls that never reached an actor
    retry_backoff: float = 0.01
    max_body: int = wire.DEFAULT_MAX_BODY
    token: str | None = None
    metrics_window: float = 60.0


class Router:
    def __init__(self, config: RouterConfig, discovery: Discovery) -> None:
        self.config = config
        self.discovery = discovery
        self.table = RoutingTable(SessionCodec(config.token))
        self.upstreams: dict[int, Upstream] = {}
        self.retries_total = 0
        self.polled_once = False
        self._auth = wire.bearer(config.token)
        self._auth_line = b"authorization: " + self._auth + b"\r\n" if self._auth else b""
        self._tasks: list[asyncio.Task[Any]] = []
        self.native: NativeRelay | None = None

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
        self.upstreams[index] = Upstream(host, port)
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
            now = time.monotonic()
            for upstream in list(self.upstreams.values()):
                upstream.expire(now)

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
            resp = await upstream.request(b"GET", b"/healthz", b"", b"", self.config.health_timeout)
            if resp.status != 200:
                raise ConnectionLost(f"/healthz answered {resp.status}")
            health = wire.decode(resp.body)
        except (
            ConnectFailed,
            ConnectionLost,
            UpstreamTimeout,
            KubeforgeError,
            TimeoutError,
        ) as exc:
            if replica.index in self.table.replicas:
                self.table.report(replica, None, str(exc))
            return
        if replica.index in self.table.replicas:
            self.table.report(replica, health)

    async def call(
        self,
        path: str,
        body: bytes,
        headers: dict[bytes, bytes],
        tried: set[int] | None = None,
        attempt: int = 0,
    ) -> Response:
        """The general call path: placement of new and moved sessions, connects, retries.

        `headers` are the call's wire headers (lower-case names): session, content type,
        timeout, session-moved preference.
        """
        sid_raw = headers.get(wire.H_SESSION)
        extra = self._forwarded(headers)
        path_b = path.encode()
        tried = tried or set()
        while True:
            placement: Placement | None = None
            if sid_raw is None:
                replica = self.table.pick(frozenset(tried))
                line = extra
            else:
                placement = await self._place(sid_raw.decode(), frozenset(tried))
                replica = placement.replica
                if (
                    placement.moved_from is not None
                    and headers.get(wire.H_SESSION_MOVED, b"").lower() == b"error"
                ):
                    raise SessionMovedError(
                        f"session {sid_raw.decode()!r} lost its replica and now lives on "
                        f"{replica.name} as {placement.session_id!r}; state kept on the old "
                        "replica is gone",
                        session_id=placement.session_id,
                        replica=replica.name,
                    )
                line = extra + b"x-kubeforge-session: " + placement.session_id.encode() + b"\r\n"
            try:
                resp = await self._send(replica, path_b, line, body)
            except ReplicaLostError:
                if not self._may_resend(sid_raw, headers) or attempt >= self.config.retries:
                    raise
                tried.add(replica.index)
                attempt += 1
                self.retries_total += 1
                continue
            except ConnectFailed as exc:
                tried.add(replica.index)
                self.table.connection_failed(replica, str(exc))
                attempt += 1
                if attempt > self.config.retries:
                    raise NoHealthyReplicasError(
                        f"call failed after {attempt} attempts; last: {exc}"
                    ) from None
                self.retries_total += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            retryable = resp.status == 503 and resp.headers.get(wire.H_RETRYABLE)
            if retryable and attempt < self.config.retries:
                # Overloaded or draining: the actor never saw the call, so it may go elsewhere.
                # A session cannot leave its replica for mere overload, only when it drains.
                draining = retryable == b"DrainingError"
                if sid_raw is None or draining:
                    if draining:
                        self.table.set_state(replica, ReplicaState.UNHEALTHY, "draining")
                    tried.add(replica.index)
                    attempt += 1
                    self.retries_total += 1
                    if len(tried) < len(self.table.replicas):
                        continue
            out = Response(resp.status, resp.body, resp.headers.get(wire.H_CONTENT_TYPE, wire.JSON))
            if placement is not None and placement.moved_from is not None:
                out.headers = [
                    (b"x-kubeforge-session", placement.session_id.encode()),
                    (_MOVED_FROM, sid_raw),
                ]
            return out

    @staticmethod
    def _may_resend(sid: bytes | None, headers: dict[bytes, bytes]) -> bool:
        """May a call that its replica's death cut short be sent to another replica?

        Only without a session (a session's state died with its replica: the caller must know)
        and unless the caller asked for at-most-once delivery. Whatever the call did inside the
        dead process is gone with it, so running it again elsewhere is what a caller of a
        stateless endpoint wants; effects outside the process may happen twice.
        """
        return sid is None and headers.get(wire.H_DELIVERY) != wire.AT_MOST_ONCE

    def _resend_lost(self, err: KubeforgeError, headers: dict[bytes, bytes]) -> bool:
        """Send again elsewhere a call whose replica was lost under it (not one that timed out)."""
        return (
            isinstance(err, ReplicaLostError)
            and self.config.retries > 0
            and self._may_resend(headers.get(wire.H_SESSION), headers)
        )

    def _forwarded(self, headers: dict[bytes, bytes]) -> bytes:
        """The header lines a call carries on to its replica: token, body type, deadline."""
        extra = self._auth_line
        ctype = headers.get(wire.H_CONTENT_TYPE)
        if ctype:
            extra += b"content-type: " + ctype + b"\r\n"
        deadline = headers.get(wire.H_TIMEOUT)
        if deadline:
            extra += b"x-kubeforge-timeout: " + deadline + b"\r\n"
        return extra

    async def _send(self, replica: Replica, path: bytes, headers: bytes, body: bytes) -> Any:
        """One relayed request, with the bookkeeping the routing core and metrics need."""
        upstream = self.upstreams[replica.index]
        replica.in_flight += 1
        started = time.monotonic()
        ok = False
        try:
            resp = await upstream.request(b"POST", path, headers, body, self.config.request_timeout)
            ok = resp.status < 400
            return resp
        except (ConnectionLost, UpstreamTimeout) as exc:
            raise self._lost(replica, exc) from None
        finally:
            self._record(replica, started, ok)

    def _record(self, replica: Replica, started: float, ok: bool) -> None:
        replica.in_flight -= 1
        now = time.monotonic()
        replica.window.record(now, now - started, ok)
        replica.total_requests += 1
        if ok:
            replica.successful_requests += 1
        else:
            replica.failed_requests += 1

    def _lost(self, replica: Replica, exc: ConnectionLost | UpstreamTimeout) -> KubeforgeError:
        """The error for a call that reached a replica and got no answer."""
        if isinstance(exc, UpstreamTimeout):
            return RequestTimeoutError(
                f"replica {replica.name} did not answer within {self.config.request_timeout:g}s",
                replica=replica.name,
            )
        self.table.connection_failed(replica, str(exc))
        return ReplicaLostError(
            f"replica {replica.name} was lost during the call ({exc}); it may or may not have run",
            replica=replica.name,
        )

    def relay(self, req: Request, conn: HttpProtocol) -> bool:
        """The common case of `call`, relayed with callbacks only, or False to take `call`.

        Taken when: a call whose session (if any) sits on its healthy replica, with the right
        token, and a pooled connection to the chosen replica. Everything else, and anything
        that needs a retry, goes through `call`, which has the same semantics.
        """
        if req.method != "POST" or not req.path.startswith(wire.CALL_PREFIX):
            return False
        if not req.path[len(wire.CALL_PREFIX) :].isidentifier():
            return False  # `handle` refuses it: the path goes into our request line
        headers = req.headers
        if self._auth is not None and headers.get(wire.H_AUTH) != self._auth:
            return False  # `call` answers 401 (with a constant-time compare)
        extra = self._forwarded(headers)
        ctype = headers.get(wire.H_CONTENT_TYPE)
        sid = headers.get(wire.H_SESSION)
        table = self.table
        try:
            if sid is None:
                replica = table.pick()
            else:
                replica = table.sticky(sid.decode())
                if replica is None:
                    return False  # the session must move first
                extra += b"x-kubeforge-session: " + sid + b"\r\n"
        except KubeforgeError:
            return False
        replica.in_flight += 1
        started = time.monotonic()

        def done(resp: ClientResponse | None, error: UpstreamError | None) -> None:
            if resp is None:
                self._record(replica, started, False)
                err = self._lost(replica, error)  # type: ignore[arg-type]
                answer = wire.error_response(err, ctype)
                if self._resend_lost(err, headers):
                    self.retries_total += 1
                    asyncio.get_running_loop().create_task(
                        self._finish_call(req, conn, {replica.index}, answer)
                    )
                    return
                conn.answer(req, answer)
                return
            self._record(replica, started, resp.status < 400)
            retryable = resp.status == 503 and resp.headers.get(wire.H_RETRYABLE)
            if (
                retryable
                and self.config.retries > 0
                and (sid is None or retryable == b"DrainingError")
            ):
                if retryable == b"DrainingError":
                    table.set_state(replica, ReplicaState.UNHEALTHY, "draining")
                self.retries_total += 1
                asyncio.get_running_loop().create_task(
                    self._finish_call(req, conn, {replica.index}, resp.raw)
                )
                return
            conn.answer(
                req,
                resp.raw
                if req.keep_alive
                else Response(
                    resp.status, resp.body, resp.headers.get(wire.H_CONTENT_TYPE, wire.JSON)
                ),
            )

        sent = self.upstreams[replica.index].send(
            b"POST", req.path.encode(), extra, req.body, self.config.request_timeout, done
        )
        if not sent:
            replica.in_flight -= 1
        return sent

    async def resume(
        self, path: str, body: bytes, headers: dict[bytes, bytes], index: int, failure: str
    ) -> Response:
        """A call the native relay sent to replica `index` that failed: what `call` would
        have done next. `failure` is `connect`, `lost`, `timeout` or `retryable <ErrorType>`."""
        replica = self.table.replicas.get(index)
        if replica is None:  # removed from the table meanwhile
            if failure == "timeout" or (
                failure == "lost" and not self._may_resend(headers.get(wire.H_SESSION), headers)
            ):
                raise ReplicaLostError(
                    f"replica {index} was removed during the call; it may or may not have run"
                )
            return await self.call(path, body, headers)
        if failure == "connect":
            self.table.connection_failed(replica, "connection failed")
            await asyncio.sleep(self._backoff(1))
        elif failure in ("lost", "timeout"):
            cut = ConnectionLost("connection lost") if failure == "lost" else UpstreamTimeout()
            err = self._lost(replica, cut)
            if not (self._resend_lost(err, headers) and len(self.table.replicas) > 1):
                raise err
        elif failure.startswith("retryable "):
            if failure == "retryable DrainingError":
                self.table.set_state(replica, ReplicaState.UNHEALTHY, "draining")
        else:
            raise ValueError(f"unknown relay failure {failure!r}")
        self.retries_total += 1
        return await self.call(path, body, headers, {index}, attempt=1)

    async def _finish_call(
        self, req: Request, conn: HttpProtocol, tried: set[int], last: Response | bytes
    ) -> None:
        """Continue a fast call that must be retried elsewhere, answering as `call` would.

        `last` is the answer of the failed attempt, given when no replica is left to try.
        """
        if len(tried) >= len(self.table.replicas):
            conn.answer(req, last)
            return
        try:
            resp = await self.call(req.path, req.body, req.headers, tried, attempt=1)
        except KubeforgeError as err:
            resp = wire.error_response(err, req.headers.get(wire.H_CONTENT_TYPE))
        conn.answer(req, resp)

    def _backoff(self, attempt: int) -> float:
        return min(self.config.retry_backoff * 2 ** (attempt - 1), 0.5) * random.uniform(0.5, 1)

    async def _place(self, session_id: str, exclude: frozenset[int]) -> Placement:
        """Where a session goes now; a fresh placement is registered with its replica first."""
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
            except ConnectFailed as exc:
                self.table.connection_failed(placement.replica, str(exc))
                tried.add(placement.replica.index)
                placement = self.table.move(session_id, placement.moved_from or 0, frozenset(tried))
        return placement

    async def _register(self, replica: Replica, session_id: str) -> None:
        resp = await self.upstreams[replica.index].request(
            b"POST",
            f"{wire.SESSIONS_PATH}/{session_id}".encode(),
            self._auth_line,
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
        replica = self.table.current(session_id)
        self.table.forget(session_id)
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
                f"{wire.SESSIONS_PATH}/{target}".encode(),
                self._auth_line,
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

    async def broadcast(self, endpoint: str, body: bytes, ctype: bytes | None) -> Response:
        replicas = list(self.table.healthy)
        if not replicas:
            raise NoHealthyReplicasError(self.table._no_healthy_message())
        use_msgpack = wire.is_msgpack(ctype)
        headers = self._auth_line + (b"content-type: " + ctype + b"\r\n" if ctype else b"")
        path = (wire.CALL_PREFIX + endpoint).encode()
        outcomes = await asyncio.gather(
            *(self._send(r, path, headers, body) for r in replicas), return_exceptions=True
        )
        results: list[Any] = []
        errors: dict[str, Any] = {}
        statuses: set[int] = set()
        for replica, outcome in zip(replicas, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                err = (
                    outcome
                    if isinstance(outcome, KubeforgeError)
                    else ReplicaLostError(f"{type(outcome).__name__}: {outcome}")
                )
                errors[replica.name] = err.to_wire()
                statuses.add(err.status)
                results.append(None)
                continue
            try:
                body = wire.decode(
                    outcome.body, wire.is_msgpack(outcome.headers.get(wire.H_CONTENT_TYPE))
                )
            except KubeforgeError:
                body = {
                    "error": {
                        "type": "ReplicaLostError",
                        "message": f"unreadable reply ({outcome.status})",
                    }
                }
            if outcome.status < 300:
                results.append(body.get("result"))
            else:
                errors[replica.name] = body.get("error", body)
                statuses.add(outcome.status)
                results.append(None)
        names = [r.name for r in replicas]
        if len(errors) == len(replicas) and len(statuses) == 1 and 400 <= min(statuses) < 500:
            # Every replica rejected the call the same way: the caller's mistake, say it once.
            return Response(
                statuses.pop(), wire.encode({"error": next(iter(errors.values()))}, use_msgpack)
            )
        body = {"results": results, "replicas": names, "errors": errors}
        return Response(
            200, wire.encode(body, use_msgpack), wire.MSGPACK if use_msgpack else wire.JSON
        )
