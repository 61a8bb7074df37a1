"""A broadcast's replies as the router assembles them, whoever sent the broadcast.

The engine sends a broadcast itself on the Python call path; the native relay sends it on its
own and answers it when every replica answered the call (relay/src/broadcast.rs). When one did
not (it failed, refused, or answered in a shape the relay does not splice), the relay passes
the request on with `x-kubeforge-relay-broadcast: <id>`, the Python server takes every
replica's outcome from the relay by that id, and the engine answers from them exactly as from
replies it collected itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """A replica's answer to its part of a broadcast."""

    status: int
    content_type: bytes | None
    body: Any


@dataclass(frozen=True, slots=True)
class Relayed:
    """One replica's outcome as the relay reports it: its answer, or why none came (the
    relay's report: `connect`, `lost` or `timeout`)."""

    index: int
    name: str
    outcome: Reply | str


def relayed(rows: list[tuple[int, str, int | None, bytes | None, Any]]) -> list[Relayed]:
    """The relay's outcomes (`Relay.take_broadcast`), in the order it sent to the replicas."""
    out = []
    for index, name, status, content_type, body in rows:
        outcome = body if status is None else Reply(status, content_type, body)
        out.append(Relayed(index, name, outcome))
    return out
