"""The one rule for re-sending a call whose attempt failed. Pure: no I/O, no clock, no chance.

Every call path asks `decide` after a failed attempt: the Python engine's `call`, its
callback-only relay, and `resume` for attempts the native relay made (the relay only reports
what happened, as `Outcome.report`). So `--retries`, at-most-once delivery and sessions mean the
same thing whichever path a call takes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kubeforge import wire

_DRAINING_TYPE = b"DrainingError"


class Outcome(enum.StrEnum):
    """What happened to one attempt, when it did not produce the call's answer."""

    CONNECT = "connect"  # never reached the replica
    LOST = "lost"  # the connection broke after the call was sent: it may have run
    TIMEOUT = "timeout"  # no answer in time: it may still be running
    OVERLOADED = "overloaded"  # the replica refused it, full, before the actor saw it
    DRAINING = "draining"  # the replica refused it, shutting down, before the actor saw it
    ABANDONED = "abandoned"  # the caller's body stopped arriving: nothing to send, no one to blame

    @classmethod
    def of_answer(cls, status: int, retryable: bytes | None) -> Outcome | None:
        """A replica's answer as an outcome, or None when it is the call's own answer."""
        if status != 503 or not retryable:
            return None
        return cls.DRAINING if retryable == _DRAINING_TYPE else cls.OVERLOADED

    @classmethod
    def of_report(cls, report: str) -> Outcome:
        """The native relay's report: `connect`, `lost`, `timeout` or `refused <ErrorType>`."""
        kind, _, detail = report.partition(" ")
        if kind == "refused" and detail:
            refused = cls.of_answer(503, detail.encode())
            assert refused is not None
            return refused
        if kind in (cls.CONNECT, cls.LOST, cls.TIMEOUT) and not detail:
            return cls(kind)
        raise ValueError(f"unknown relay report {report!r}")

    @property
    def unhealthy_reason(self) -> str | None:
        """Why this outcome takes the replica out of rotation now (passive health), if it does."""
        return _UNHEALTHY.get(self)


_UNHEALTHY = {
    Outcome.CONNECT: "connection failed",
    Outcome.LOST: "connection lost",
    Outcome.DRAINING: "draining",
}

MAX_BACKOFF = 0.5


@dataclass(frozen=True, slots=True)
class Decision:
    resend: bool
    why: str
    # Upper bound of the pause before the next attempt; the caller draws the jitter.
    backoff: float = 0.0


def decide(
    outcome: Outcome,
    attempt: int,
    budget: int,
    *,
    at_most_once: bool,
    in_session: bool,
    others: int,
    time_left: float = float("inf"),
    backoff_base: float = 0.01,
    replayable: bool = True,
) -> Decision:
    """May the call be sent again, to another healthy replica not tried yet?

    `attempt` counts the re-sends already made, `budget` is how many are allowed (`--retries`),
    `others` how many healthy replicas the call has not tried, `time_left` the seconds left of
    the call's deadline (the router's, or the caller's when it is sooner). Where it goes is
    always the least-loaded of those replicas; a call in a session takes its session there.

    - A call whose caller stopped sending its body is not sent anywhere again (nor does it count
      against the replica's health).
    - A timeout is never re-sent: the call may still be running.
    - A call lost with its replica is re-sent only without a session (its session's state died
      with the replica, so the caller must know) and unless the caller asked for at-most-once.
    - Overload keeps a session on its replica: only calls without one go elsewhere.
    - A refused connect or a draining replica never reached the actor: any call may go on.
    - A body that streamed on to the replica (`replayable=False`: larger than the router
      holds) is gone once sent: only a refused connect, before any of it left, may go on.
    """
    if outcome is Outcome.ABANDONED:
        return Decision(False, "the caller's body did not arrive whole")
    if not replayable and outcome is not Outcome.CONNECT:
        return Decision(False, "its body was streamed to the replica and is not kept")
    if outcome is Outcome.TIMEOUT:
        return Decision(False, "the call may still be running")
    if outcome is Outcome.LOST and in_session:
        return Decision(False, "the session's replica was lost")
    if outcome is Outcome.LOST and at_most_once:
        return Decision(False, "at-most-once delivery")
    if outcome is Outcome.OVERLOADED and in_session:
        return Decision(False, "a session stays on its overloaded replica")
    if attempt >= budget:
        return Decision(False, f"retry budget of {budget} spent")
    if others < 1:
        return Decision(False, "no other healthy replica")
    if time_left <= 0:
        return Decision(False, "the call's deadline has passed")
    backoff = min(backoff_base * 2**attempt, MAX_BACKOFF) if outcome is Outcome.CONNECT else 0.0
    return Decision(True, f"re-send after {outcome}", backoff)


def at_most_once(headers: dict[bytes, bytes]) -> bool:
    """The caller's delivery mode, from its request headers."""
    return headers.get(wire.H_DELIVERY) == wire.AT_MOST_ONCE
