"""torchforge's `Service` API surface, shared by the local `Service` and `ServiceClient`.

Both speak the same wire protocol to the same router engine (in-process or over HTTP); this
module holds everything above the transport: endpoint handles, sessions and their moves,
broadcast, typed errors and the metrics objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kubeforge import streams, values, wire
from kubeforge.errors import (
    BadRequestError,
    BroadcastError,
    KubeforgeError,
    ReplicaLostError,
    from_wire,
)

log = logging.getLogger("kubeforge.service")

_current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kubeforge_session", default=None
)


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[bytes, bytes] = field(default_factory=dict)
    # A streamed reply: stops the stream when its reader is done or gone (the replica's
    # generator is cancelled when it had not ended).
    release: Callable[[], Awaitable[None]] | None = None

    async def close(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            await release()


class ReplicaResult(NamedTuple):
    """One replica's answer to a broadcast, as `fanout_stream()` yields it."""

    replica: str
    result: Any
    error: KubeforgeError | None = None

    def value(self) -> Any:
        """The result, or the replica's error raised."""
        if self.error is not None:
            raise self.error
        return self.result


class Session(str):
    """A session id that is also what torchforge's `async with svc.session() as s:` yields:
    `s.session_id` is the id, and `s` itself is the id, as kubeforge's `Service` yields it."""

    __slots__ = ()

    @property
    def session_id(self) -> str:
        return str(self)


# Monarch's actor verbs: on a service they are a mistake, and the error says what to use.
# (`stream` is a streaming endpoint's verb on both.)
ACTOR_VERBS = ("call_one", "call", "choose", "broadcast", "generate")


class EndpointHandle:
    """`svc.ep(session_id_or_None, *args)`, `svc.ep.route(*args, sess_id=...)`, `.fanout()`."""

    def __init__(self, api: ServiceAPI, name: str) -> None:
        self._api = api
        self.name = name

    def __getattr__(self, verb: str) -> Any:
        if verb in ACTOR_VERBS:
            raise NotImplementedError(
                f"You tried to use {verb}() on a service, not an actor. Services only support "
                f"route() and fanout(): `await svc.{self.name}.route(...)` calls one replica, "
                f"`await svc.{self.name}.fanout(...)` calls every replica. For an actor's "
                f"verbs, start it with `.as_actor()`."
            )
        raise AttributeError(f"{type(self).__name__} {self.name!r} has no attribute {verb!r}")

    async def __call__(self, sess_id: str | None, *args: Any, **kwargs: Any) -> Any:
        return await self._api._call(self.name, self._session_id(sess_id), args, kwargs)

    async def route(self, *args: Any, sess_id: str | None = None, **kwargs: Any) -> Any:
        """One replica: the session's (argument, or the enclosing `session()`), else the
        least-loaded. A session id is one `start_session()` issued or any name of the caller's
        (placed on first use, as in torchforge)."""
        return await self._api._call(self.name, self._session_id(sess_id), args, kwargs)

    def _session_id(self, sess_id: Any) -> str | None:
        if sess_id is None or isinstance(sess_id, str):
            return sess_id
        raise TypeError(
            f"svc.{self.name}(sess_id, *args): the first argument is a session id (a str, or "
            f"None for no session), not {type(sess_id).__name__}; to call without a session, "
            f"use `await svc.{self.name}.route(...)`"
        )

    def stream(self, *args: Any, sess_id: str | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        """A streaming endpoint (a generator): `async for item in svc.ep.stream(...)`. It is
        placed like `route()` (the session's replica, else the least-loaded); leaving the
        loop early cancels the generator on its replica."""
        return self._api._stream(self.name, self._session_id(sess_id), args, kwargs)

    def fanout_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ReplicaResult]:
        """`fanout`, each replica's answer as it arrives (Monarch's `stream()`):
        `ReplicaResult(replica, result, error)`; a failed replica yields its error."""
        return self._api._fanout_stream(self.name, args, kwargs)

    async def fanout(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Every healthy replica, results in replica order (== `call_all`)."""
        return await self._api.call_all(self.name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<endpoint {self.name}>"


class ServiceAPI(ABC):
    """The calls every kubeforge service front end offers; subclasses supply the transport."""

    raise_on_session_moved: bool = False
    # A call without a session that its replica's death cut short is sent to another replica
    # unless this is set (DESIGN §3); set it when an endpoint's outside effects must not repeat.
    at_most_once: bool = False
    # torchforge's return_first_rank_result: False asks SPMD replicas for every rank's result.
    return_first_rank_result: bool = True
    # How calls are encoded: kubeforge's binary format (arrays, tensors, tuples and classes
    # keep their types), or "json" / "msgpack" (what other languages speak).
    body_format: str = wire.FMT_BINARY

    def __init__(self, actor: type | None = None) -> None:
        self._moved: dict[str, str] = {}  # session id the caller holds -> where it lives now
        self.sessions_moved = 0
        # Classes a reply may rebuild: those the actor's endpoints name in their hints (and
        # any registered with kubeforge.register_type).
        self.allowed = allowed_by(actor)

    # transport --------------------------------------------------------------------------

    @abstractmethod
    async def _send_call(self, endpoint: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        """POST /v1/call/{endpoint}; typed errors may be raised instead of returned."""

    @abstractmethod
    async def _send_stream(self, path: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        """POST to `path` (a stream, or a broadcast answered as one): a Reply whose body
        iterates the chunks as they come (an error reply's body is whole), and whose
        `close()` lets the stream go."""

    @abstractmethod
    async def _send_broadcast(
        self, endpoint: str, body: bytes, headers: dict[bytes, bytes]
    ) -> Reply: ...

    @abstractmethod
    async def _send_start_session(self) -> Reply: ...

    @abstractmethod
    async def _send_end_session(self, session_id: str) -> Reply: ...

    def _check_endpoint(self, name: str) -> None:
        """Raise AttributeError for a name the actor does not have (when that is known)."""
        return  # unknown here: the replica's 404 will say so

    # calls ------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> EndpointHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        self._check_endpoint(name)
        return EndpointHandle(self, name)

    async def _call(
        self,
        endpoint: str,
        sess_id: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        all_ranks: bool | None = None,
    ) -> Any:
        """One call to one replica. `all_ranks` overrides `return_first_rank_result` for this
        call (an actor's `call()` wants every rank, its `choose()` rank 0)."""
        sid = sess_id if sess_id is not None else _current_session.get()
        body = _encode_call(endpoint, args, kwargs, self.body_format)
        reply = await self._send_call(endpoint, body, self._call_headers(sid, all_ranks))
        self._note_moved(sid, reply)
        data = decode_reply(reply, self.allowed)
        return data["result"]

    async def _stream(
        self, endpoint: str, sess_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """A streaming endpoint's items as they arrive. The call is placed, and sent again
        when it failed before its first item, exactly as a call is; after that, an error ends
        the stream as the endpoint's typed error, and a stream cut short (its replica lost)
        raises ReplicaLostError: items already delivered are never sent twice."""
        sid = sess_id if sess_id is not None else _current_session.get()
        body = _encode_call(endpoint, args, kwargs, self.body_format)
        path = wire.STREAM_PREFIX + endpoint
        reply = await self._send_stream(path, body, self._call_headers(sid))
        try:
            self._note_moved(sid, reply)
            async for item in self._items(reply, path):
                yield item
        finally:
            await reply.close()

    async def _fanout_stream(
        self, endpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[ReplicaResult]:
        """`fanout`, each replica's answer as soon as it has it."""
        body = _encode_call(endpoint, args, kwargs, self.body_format)
        headers = {
            wire.H_CONTENT_TYPE: wire.content_type(self.body_format),
            wire.H_ACCEPT: streams.CONTENT_TYPE,
            **self._ranks_header(),
        }
        path = wire.CALL_ALL_PREFIX + endpoint
        reply = await self._send_stream(path, body, headers)
        try:
            async for item in self._items(reply, path):
                result = item.get("result")
                if self.body_format == wire.FMT_BINARY and result is not None:
                    result = result["result"]  # the replica's reply, nested whole
                error = from_wire(item["error"]) if "error" in item else None
                yield ReplicaResult(item["replica"], result, error)
        finally:
            await reply.close()

    async def _items(self, reply: Reply, path: str) -> AsyncIterator[Any]:
        """The items of a streamed reply as they arrive; an error frame raises its typed
        error, a stream cut before its end raises ReplicaLostError."""
        item_type = streams.item_type(reply.headers.get(wire.H_CONTENT_TYPE))
        if reply.status >= 300 or item_type is None:
            decode_reply(reply, self.allowed)  # raises the error it carries
            raise BadRequestError(f"POST {path} was not answered with a stream")
        fmt = wire.body_format(item_type)
        reader = streams.FrameReader()
        items = 0
        async for chunk in reply.body:  # to its last chunk, which frees the connection
            for kind, payload in reader.feed(chunk):
                if kind == streams.ITEM:
                    items += 1
                    yield wire.decode_as(payload, fmt, self.allowed)
                elif kind == streams.ERROR:
                    error = wire.decode(payload, fmt == wire.FMT_MSGPACK).get("error", {})
                    raise from_wire(error)
        if not reader.ended:
            raise ReplicaLostError(
                f"the stream of POST {path} was cut after {items} items, before its end: its "
                "replica (or a connection on the way) was lost; the items already yielded "
                "are not sent again"
            )

    def _call_headers(self, sid: str | None, all_ranks: bool | None = None) -> dict[bytes, bytes]:
        headers: dict[bytes, bytes] = {wire.H_CONTENT_TYPE: wire.content_type(self.body_format)}
        if sid is not None:
            headers[wire.H_SESSION] = self._moved.get(sid, sid).encode()
            if self.raise_on_session_moved:
                headers[wire.H_SESSION_MOVED] = b"error"
        elif self.at_most_once:
            headers[wire.H_DELIVERY] = wire.AT_MOST_ONCE
        headers.update(self._ranks_header(all_ranks))
        return headers

    def _note_moved(self, sid: str | None, reply: Reply) -> None:
        """A session whose replica was lost continues under the id the reply gives."""
        if sid is not None and wire.H_SESSION_MOVED_FROM in reply.headers:
            new_id = reply.headers[wire.H_SESSION].decode()
            self._moved[sid] = new_id
            self.sessions_moved += 1
            log.warning(
                "session %s lost its replica; it continues as %s (state kept on the "
                "old replica is gone)",
                sid,
                new_id,
            )

    async def call_all(self, function: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `function` on every healthy replica; results in replica order.

        Raises `BroadcastError` (with every result and every error) when any replica failed,
        and `NoHealthyReplicasError` (a RuntimeError, as in torchforge) when none is healthy.
        """
        reply = await self._send_broadcast(
            function,
            _encode_call(function, args, kwargs, self.body_format),
            {wire.H_CONTENT_TYPE: wire.content_type(self.body_format), **self._ranks_header()},
        )
        data = decode_reply(reply, self.allowed)
        if wire.body_format(reply.headers.get(wire.H_CONTENT_TYPE)) == wire.FMT_BINARY:
            # Each replica's own reply, nested undecoded by the router: {"result": ...}.
            data["results"] = [None if r is None else r["result"] for r in data["results"]]
        errors = {name: from_wire(err) for name, err in data["errors"].items()}
        if errors:
            first = next(iter(errors.items()))
            raise BroadcastError(
                f"{function} failed on {len(errors)} of {len(data['replicas'])} replicas "
                f"(first: {first[0]}: {first[1]})",
                data["results"],
                data["replicas"],
                errors,
            )
        return data["results"]

    def _ranks_header(self, all_ranks: bool | None = None) -> dict[bytes, bytes]:
        """Every rank's result, in rank order, instead of rank 0's (replicas with procs > 1)."""
        every = not self.return_first_rank_result if all_ranks is None else all_ranks
        return {wire.H_RANKS: wire.ALL_RANKS} if every else {}

    async def start_session(self) -> Session:
        """A new session on the least-loaded replica; calls that name it stick to it."""
        return Session(decode_reply(await self._send_start_session())["session_id"])

    async def terminate_session(self, sess_id: str) -> None:
        """End a session: its replica's actor gets `on_session_end(sess_id)`."""
        current = self._moved.pop(sess_id, sess_id)
        decode_reply(await self._send_end_session(current))

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """Calls inside the block (that name no session) stick to one new session."""
        sid = await self.start_session()
        token = _current_session.set(sid)
        try:
            yield sid
        finally:
            _current_session.reset(token)
            with contextlib.suppress(KubeforgeError):
                await self.terminate_session(sid)


def allowed_by(actor: type | None) -> values.Allowed:
    """The classes that the endpoints of `actor` name in their type hints."""
    if actor is None:
        return values.Allowed()
    from kubeforge.actor import actor_class, endpoints_of

    cls = actor_class(actor)
    return values.Allowed.from_hints(*(getattr(cls, name) for name in endpoints_of(cls)))


def _encode_call(
    endpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any], fmt: str
) -> bytes | values.Encoded:
    try:
        return wire.call_body(args, kwargs, fmt)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments to {endpoint!r} cannot be sent as {fmt}: {exc}") from None


def decode_reply(reply: Reply, allowed: values.Allowed | None = None) -> Any:
    """A reply's content, or the typed error it carries. A binary reply holding a class the
    caller does not allow raises BadRequestError naming it."""
    data = wire.decode_as(
        reply.body, wire.body_format(reply.headers.get(wire.H_CONTENT_TYPE)), allowed
    )
    if reply.status >= 300:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise from_wire(error or {"type": "HTTPError", "message": f"HTTP {reply.status}"})
    return data


# metrics ----------------------------------------------------------------------------------


@dataclass
class ReplicaMetrics:
    """One replica's figures over the metrics window (torchforge's names)."""

    replica_idx: int
    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    request_rate: float = 0.0
    avg_latency: float = 0.0
    active_requests: int = 0
    queue_depth: int = 0
    assigned_sessions: int = 0
    capacity_utilization: float = 0.0
    state: str = ""
    p50_latency: float = 0.0
    p95_latency: float = 0.0
    p99_latency: float = 0.0
    batches: dict[str, dict[str, float]] = field(default_factory=dict)  # per batched endpoint

    def get_avg_batch_size(self, endpoint: str) -> float:
        """Mean calls per batch of a batched endpoint on this replica (0.0 before any)."""
        return float(self.batches.get(endpoint, {}).get("avg_batch_size", 0.0))

    def get_request_rate(self) -> float:
        return self.request_rate

    def get_avg_latency(self) -> float:
        return self.avg_latency

    def get_capacity_utilization(self) -> float:
        return self.capacity_utilization


@dataclass
class ServiceMetrics:
    """torchforge's `ServiceMetrics`: service totals and `replica_metrics[idx]`."""

    total_sessions: int = 0
    healthy_replicas: int = 0
    total_replicas: int = 0
    replica_metrics: dict[int, ReplicaMetrics] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> ServiceMetrics:
        replicas: dict[int, ReplicaMetrics] = {}
        for idx, entry in summary["replicas"].items():
            known = {k: v for k, v in entry.items() if k in ReplicaMetrics.__dataclass_fields__}
            replicas[int(idx)] = ReplicaMetrics(replica_idx=int(idx), **known)
        service = summary["service"]
        return cls(
            service["total_sessions"],
            service["healthy_replicas"],
            service["total_replicas"],
            replicas,
            summary,
        )

    def get_total_request_rate(self) -> float:
        return sum(r.request_rate for r in self.replica_metrics.values())

    def _healthy(self) -> list[ReplicaMetrics]:
        return [r for r in self.replica_metrics.values() if r.state == "HEALTHY"]

    def get_avg_queue_depth(self) -> float:
        healthy = self._healthy()
        return sum(r.queue_depth for r in healthy) / len(healthy) if healthy else 0.0

    def get_avg_capacity_utilization(self) -> float:
        healthy = self._healthy()
        return sum(r.capacity_utilization for r in healthy) / len(healthy) if healthy else 0.0

    def get_sessions_per_replica(self) -> float:
        return self.total_sessions / self.total_replicas if self.total_replicas else 0.0


def summary_with_int_keys(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON turns `replicas[0]` into `replicas["0"]`; give callers torchforge's int keys back."""
    return {**summary, "replicas": {int(k): v for k, v in summary["replicas"].items()}}
