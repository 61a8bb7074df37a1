"""Errors shared by the replica, the router and the clients.

Each error has one HTTP status and one wire name (`type` in the error body), so a failure keeps
its meaning across every hop: the replica raises it, the router relays it byte for byte, and the
client turns the body back into the same exception class.
"""

from __future__ import annotations

from typing import Any


class KubeforgeError(Exception):
    """Base of every error kubeforge itself raises (not the actor's own exceptions)."""

    status: int = 500
    retryable: bool = False  # True when the call never reached the actor and may go elsewhere

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": type(self).__name__, "message": self.message}
        body.update(self.details)
        return body


class BadRequestError(KubeforgeError):
    """Malformed input: the caller must fix the request; retrying it cannot help."""

    status = 400


class UnauthorizedError(KubeforgeError):
    status = 401


class UnknownEndpointError(KubeforgeError):
    status = 404


class UnknownSessionError(KubeforgeError):
    status = 404


class InvalidArgumentsError(KubeforgeError):
    """The arguments do not bind to the endpoint's signature (the TypeError text is kept)."""

    status = 422


class PayloadTooLargeError(KubeforgeError):
    status = 413


class SessionMovedError(KubeforgeError):
    """The session's replica was lost; the session now lives on another replica.

    Raised only when the caller asked for it (header `X-Kubeforge-Session-Moved: error`);
    `details["session_id"]` is the session's new id.
    """

    status = 409


class OverloadedError(KubeforgeError):
    """The replica's concurrency slots and queue are full, or the queue wait ran out."""

    status = 503
    retryable = True


class DrainingError(KubeforgeError):
    """The replica is shutting down and takes no new calls."""

    status = 503
    retryable = True


class NoHealthyReplicasError(KubeforgeError, RuntimeError):
    """No replica can take the call (a RuntimeError, as in torchforge)."""

    status = 503


class UnguardedMainError(KubeforgeError, RuntimeError):
    """A script started kubeforge processes while a replica imported it; refused, not recursed.

    multiprocessing raises a RuntimeError for the same mistake ("before the current process has
    finished its bootstrapping phase"); this one names the script and the guard to add.
    """


class NestedSpawnError(KubeforgeError, RuntimeError):
    """A process kubeforge started tried to start kubeforge processes: the depth guard.

    Replicas and routers never start replicas, so refusing it bounds any recursion the
    unguarded-main check missed to one level.
    """


class RequestTimeoutError(KubeforgeError, TimeoutError):
    status = 504


class ReplicaLostError(KubeforgeError):
    """The connection to the replica broke after the call was sent: it may or may not have run."""

    status = 502


class RemoteError(KubeforgeError):
    """The endpoint itself raised. `remote_type`, `message` and `traceback` describe it."""

    status = 500

    def __init__(self, remote_type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.traceback = traceback

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.remote_type,
            "message": self.remote_message,
            "origin": "endpoint",
        }
        if self.traceback:
            body["traceback"] = self.traceback
        return body


class BroadcastError(KubeforgeError):
    """A broadcast where at least one replica failed; keeps every result and every error."""

    status = 500

    def __init__(
        self,
        message: str,
        results: list[Any],
        replicas: list[str],
        errors: dict[str, KubeforgeError],
    ) -> None:
        super().__init__(message)
        self.results = results
        self.replicas = replicas
        self.errors = errors


_WIRE_TYPES: dict[str, type[KubeforgeError]] = {
    cls.__name__: cls
    for cls in (
        BadRequestError,
        UnauthorizedError,
        UnknownEndpointError,
        UnknownSessionError,
        InvalidArgumentsError,
        PayloadTooLargeError,
        SessionMovedError,
        OverloadedError,
        DrainingError,
        NoHealthyReplicasError,
        RequestTimeoutError,
        ReplicaLostError,
    )
}


def from_wire(error: dict[str, Any], status: int | None = None) -> KubeforgeError:
    """Rebuild the exception a peer described in an error body."""
    etype = str(error.get("type", "Error"))
    message = str(error.get("message", ""))
    if error.get("origin") == "endpoint" or etype not in _WIRE_TYPES:
        return RemoteError(etype, message, error.get("traceback"))
    details = {k: v for k, v in error.items() if k not in ("type", "message")}
    return _WIRE_TYPES[etype](message, **details)
