"""The routing core: replica states, least-loaded choice, session placement. Pure: no I/O.

The router server feeds it health reports and call outcomes and asks it where to send calls.
Load of a replica = this router's own calls in flight to it + the load other callers put on it
(what the replica last reported, less our own share at that moment). Ties are broken by a
rotating start, so equal replicas take turns instead of the first one taking everything.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubeforge.errors import NoHealthyReplicasError
from kubeforge.metrics import Histogram, SlidingWindow
from kubeforge.router.sessions import SessionCodec

log = logging.getLogger("kubeforge.router")

_ALIAS_MEMORY = 100_000
# Health polls in a row that may time out before a HEALTHY replica leaves rotation (`report`).
FORGIVEN_SLOW_POLLS = 1


class ReplicaState(enum.StrEnum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"


@dataclass(eq=False)
class Replica:
    index: int
    name: str
    url: str
    window: SlidingWindow
    state: ReplicaState = ReplicaState.STARTING
    instance: str | None = None
    in_flight: int = 0  # this router's calls to it, now (on the Python call path)
    relayed: int = 0  # this router's calls to it through the native relay, at its last drain
    external: int = 0  # everyone else's running + queued calls, as last reported
    active: int = 0  # calls running on it, as last reported
    queued: int = 0  # queue depth it last reported
    sessions_reported: int = 0
    sessions_added: int = 0  # sessions this router placed on it since its last report
    max_concurrent: int = 1
    ranks: int = 1  # processes of an SPMD replica (procs x hosts), from its /healthz
    token_digest: str = ""  # the tokens it has loaded, from its /healthz (a rotation waits)
    slow_polls: int = 0  # health polls in a row that timed out while it was HEALTHY
    batches: dict[str, dict[str, int]] = field(default_factory=dict)  # per batched endpoint
    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    reason: str = ""  # why it is not HEALTHY, for status tables
    durations: Histogram = field(default_factory=Histogram)  # since start, for /metrics

    def record(self, now: float, seconds: float, ok: bool) -> None:
        """One finished call, from either call path."""
        self.window.record(now, seconds, ok)
        self.durations.observe(seconds)
        self.total_requests += 1
        if ok:
            self.successful_requests += 1
        else:
            self.failed_requests += 1

    def record_tally(
        self,
        now: float,
        count: int,
        errors: int,
        latency_sum: float,
        hist: list[tuple[int, int]],
        durations: list[int],
    ) -> None:
        """Calls the native relay finished, tallied on metrics.SCALE: as `record` for each."""
        self.window.record_tally(now, count, errors, latency_sum, hist)
        self.durations.observe_tally(durations, latency_sum)
        self.total_requests += count
        self.successful_requests += count - errors
        self.failed_requests += errors

    @property
    def load(self) -> int:
        return self.in_flight + self.relayed + self.external

    @property
    def open_calls(self) -> int:
        """This router's calls to it, now, on either call path."""
        return self.in_flight + self.relayed

    @property
    def sessions(self) -> int:
        return self.sessions_reported + self.sessions_added


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a session call goes.

    `session_id` is the id to use from now on: a new one when the session was re-pinned
    (`moved_from` then names the lost replica). `fresh` says the replica has not yet been told
    about this id and must register it before the call.
    """

    replica: Replica
    session_id: str
    moved_from: int | None = None
    fresh: bool = False


class RoutingTable:
    def __init__(self, codec: SessionCodec) -> None:
        self.codec = codec
        self.replicas: dict[int, Replica] = {}
        self.healthy: list[Replica] = []  # HEALTHY replicas in index order
        self.aliases: OrderedDict[str, str] = OrderedDict()  # re-pinned session -> new id
        # Caller-named sessions -> (replica index, instance) they were last seen on: a cache,
        # since the replicas are asked where a name lives whenever it is not usable.
        self.named: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self.sessions_moved = 0
        self._turn = 0
        self.on_change: Callable[[], None] | None = None  # membership or health changed

    # membership and health ----------------------------------------------------------------

    def add(self, replica: Replica) -> None:
        self.replicas[replica.index] = replica
        self._refresh()

    def remove(self, index: int) -> Replica | None:
        replica = self.replicas.pop(index, None)
        if replica is not None:
            replica.state = ReplicaState.STOPPED
            self._refresh()
        return replica

    def _refresh(self) -> None:
        self.healthy = sorted(
            (r for r in self.replicas.values() if r.state is ReplicaState.HEALTHY),
            key=lambda r: r.index,
        )
        if self.on_change is not None:
            self.on_change()

    def set_state(self, replica: Replica, state: ReplicaState, reason: str = "") -> None:
        if replica.state is not state:
            log.info(
                "replica %s: %s -> %s%s",
                replica.name,
                replica.state.value,
                state.value,
                f" ({reason})" if reason else "",
            )
            replica.state = state
            self._refresh()
        replica.reason = reason

    def report(
        self,
        replica: Replica,
        health: dict[str, Any] | None,
        error: str = "",
        timed_out: bool = False,
    ) -> None:
        """Apply one health poll: the replica's /healthz body, or None when the poll failed.

        A HEALTHY replica whose poll only timed out stays in rotation for FORGIVEN_SLOW_POLLS
        polls: on a busy machine one slow answer is no failure, and leaving rotation moves
        every session it holds. A refused or cut connection (a dead process) counts at once."""
        if health is None:
            if (
                timed_out
                and replica.state is ReplicaState.HEALTHY
                and replica.slow_polls < FORGIVEN_SLOW_POLLS
            ):
                replica.slow_polls += 1
                return
            replica.slow_polls = 0
            self.set_state(replica, ReplicaState.UNHEALTHY, error or "health check failed")
            return
        replica.slow_polls = 0
        instance = str(health.get("instance", ""))
        if replica.instance is not None and instance != replica.instance:
            log.warning(
                "replica %s restarted (instance %s -> %s): its sessions are lost",
                replica.name,
                replica.instance,
                instance,
            )
        replica.instance = instance
        running = int(health.get("in_flight", 0)) + int(health.get("queued", 0))
        replica.external = max(0, running - replica.open_calls)
        replica.active = int(health.get("in_flight", 0))
        replica.queued = int(health.get("queued", 0))
        replica.sessions_reported = int(health.get("sessions", 0))
        replica.sessions_added = 0
        replica.max_concurrent = max(1, int(health.get("max_concurrent_requests", 1)))
        replica.ranks = len(health.get("ranks") or ()) or 1
        replica.batches = batch_counts(health.get("batches"))
        replica.token_digest = str(health.get("token_digest", ""))
        if health.get("ready"):
            self.set_state(replica, ReplicaState.HEALTHY)
        elif health.get("draining"):
            self.set_state(replica, ReplicaState.UNHEALTHY, "draining")
        elif replica.state is ReplicaState.STARTING:
            replica.reason = "setup() running"
        else:
            self.set_state(replica, ReplicaState.UNHEALTHY, "not ready")

    def connection_failed(self, replica: Replica, error: str) -> None:
        """Passive detection: a call could not reach the replica."""
        self.set_state(replica, ReplicaState.UNHEALTHY, error)

    # choosing -----------------------------------------------------------------------------

    def pick(self, exclude: frozenset[int] = frozenset()) -> Replica:
        """Least-loaded healthy replica for a call without a session.

        The same choice as `_least` with load as the key, written out because it runs on
        every call of the hot path.
        """
        pool = self.healthy
        n = len(pool)
        if n == 0 or exclude:
            return self._least(lambda r: r.load, exclude)
        self._turn = turn = (self._turn + 1) % n
        best = pool[turn]
        best_load = best.in_flight + best.relayed + best.external
        for i in range(1, n):
            r = pool[(turn + i) % n]
            load = r.in_flight + r.relayed + r.external
            if load < best_load:
                best, best_load = r, load
        return best

    def pick_for_session(self, exclude: frozenset[int] = frozenset()) -> Replica:
        """Least-loaded, then fewest sessions: where a new or re-pinned session goes."""
        return self._least(lambda r: (r.load, r.sessions), exclude)

    def _least(self, key: Any, exclude: frozenset[int]) -> Replica:
        pool = self.healthy
        n = len(pool)
        if n == 0:
            raise NoHealthyReplicasError(self._no_healthy_message())
        self._turn = (self._turn + 1) % n
        best: Replica | None = None
        best_key: Any = None
        for i in range(n):
            r = pool[(self._turn + i) % n]
            if r.index in exclude:
                continue
            k = key(r)
            if best is None or k < best_key:
                best, best_key = r, k
        if best is None:
            raise NoHealthyReplicasError(
                f"no healthy replica left to try ({len(exclude)} tried and failed)"
            )
        return best

    def _no_healthy_message(self) -> str:
        if not self.replicas:
            return "no healthy replicas: the service has no replicas"
        states = ", ".join(
            f"{r.name}={r.state.value}{f' ({r.reason})' if r.reason else ''}"
            for r in sorted(self.replicas.values(), key=lambda r: r.index)
        )
        return f"no healthy replicas: {states}"

    # sessions -----------------------------------------------------------------------------

    def new_session(self, exclude: frozenset[int] = frozenset()) -> Placement:
        replica = self.pick_for_session(exclude)
        replica.sessions_added += 1
        return Placement(replica, self.codec.new(replica.index, replica.instance or ""), fresh=True)

    def sticky(self, session_id: str) -> Replica | None:
        """The session's own replica when it can take the call as is, else None. No side effects."""
        ref = self.codec.parse(session_id)
        replica = self.replicas.get(ref.index)
        if (
            replica is not None
            and replica.state is ReplicaState.HEALTHY
            and replica.instance == ref.instance
        ):
            return replica
        return None

    def place(self, session_id: str) -> Placement:
        """Where a call in `session_id` goes; re-pins the session when its replica is gone."""
        ref = self.codec.parse(session_id)  # UnknownSessionError for ids we never issued
        replica = self.replicas.get(ref.index)
        if (
            replica is not None
            and replica.state is ReplicaState.HEALTHY
            and replica.instance == ref.instance
        ):
            return Placement(replica, session_id)
        alias = self.aliases.get(session_id)
        if alias is not None:
            placed = self.place(alias)
            return Placement(placed.replica, placed.session_id, ref.index, placed.fresh)
        return self.move(session_id, ref.index)

    def move(
        self, session_id: str, from_index: int, exclude: frozenset[int] = frozenset()
    ) -> Placement:
        target = self.pick_for_session(exclude)
        target.sessions_added += 1
        new_id = self.codec.new(target.index, target.instance or "")
        self.aliases[session_id] = new_id
        while len(self.aliases) > _ALIAS_MEMORY:
            self.aliases.popitem(last=False)
        self.sessions_moved += 1
        lost = self.replicas.get(from_index)
        log.warning(
            "session %s moved from replica %s to %s as %s",
            session_id,
            lost.name if lost else from_index,
            target.name,
            new_id,
        )
        return Placement(target, new_id, from_index, fresh=True)

    def current(self, session_id: str) -> Replica | None:
        """The replica holding a session now, without moving it (None when it is lost)."""
        ref = self.codec.parse(session_id)
        alias = self.aliases.get(session_id)
        if alias is not None:
            return self.current(alias)
        replica = self.replicas.get(ref.index)
        if replica is None or replica.instance != ref.instance:
            return None
        return replica

    def forget(self, session_id: str) -> None:
        self.aliases.pop(session_id, None)
        self.named.pop(session_id, None)

    # caller-named sessions -----------------------------------------------------------------

    def named_replica(self, name: str) -> Replica | None:
        """The healthy incarnation a caller-named session was last placed on, or None."""
        seen = self.named.get(name)
        if seen is None:
            return None
        replica = self.replicas.get(seen[0])
        if replica is None or replica.state is not ReplicaState.HEALTHY:
            return None
        return replica if replica.instance == seen[1] else None

    def learn(self, name: str, replica: Replica) -> None:
        self.named[name] = (replica.index, replica.instance or "")
        self.named.move_to_end(name)
        while len(self.named) > _ALIAS_MEMORY:
            self.named.popitem(last=False)

    def place_named(self, name: str, exclude: frozenset[int] = frozenset()) -> Placement:
        """A new placement for a name no replica holds: where a session goes (least-loaded,
        then fewest sessions). `moved_from` names the replica it was lost with, if it was."""
        seen = self.named.get(name)
        target = self.pick_for_session(exclude)
        target.sessions_added += 1
        self.learn(name, target)
        lost = seen[0] if seen is not None else None
        if lost is not None:
            self.sessions_moved += 1
            log.warning("session %s moved from replica %s to %s", name, lost, target.name)
        return Placement(target, name, lost, fresh=True)


def batch_counts(reported: Any) -> dict[str, dict[str, int]]:
    """A replica's batch counters as its health answer gave them (batches, calls, largest per
    batched endpoint), keeping only well-formed entries: a report is input, not trusted."""
    if not isinstance(reported, dict):
        return {}
    out: dict[str, dict[str, int]] = {}
    for name, counts in reported.items():
        if isinstance(name, str) and isinstance(counts, dict):
            numbers = {k: counts.get(k) for k in ("batches", "calls", "largest")}
            if all(isinstance(v, int) and v >= 0 for v in numbers.values()):
                out[name] = numbers  # type: ignore[assignment]
    return out
