"""The router's half of a Service's status, computed from metrics summaries. Pure: no I/O.

Every router pod sees only the calls that pass through it, so each one publishes its share
under `status.routers[<pod>]` (a map: merge patches from different pods never collide) and
writes `status.metrics` as the combination of every live router's latest share. Whichever
router writes last has combined everyone's latest figures, so no leader is needed; a router
skips its write when the status already says what it would write, so two routers do not echo
each other's updates.

How shares combine: request rates and in-flight counts add up; the error rate and p50 are
averages weighted by request rate; p95 and p99 take the worst router (percentiles do not add,
and the slow tail is what an operator looks for). Health, queue depth and sessions come from the
replicas' own reports, which every router polls, so they are taken from this router's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The write time: carried in status, but never a reason to write again.
_STAMP = "lastUpdateTime"
# A share with every figure at zero: what a peer's share lacks counts as zero.
_ZERO = {
    "requestRate": 0.0,
    "errorRate": 0.0,
    "p50LatencyMs": 0.0,
    "p95LatencyMs": 0.0,
    "p99LatencyMs": 0.0,
    "inFlight": 0,
    "tokenDigest": "",
    "replicas": {},
}


def _unstamped(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != _STAMP}


def share(summary: Mapping[str, Any], in_flight: float | None = None) -> dict[str, Any]:
    """This router's part of the traffic: the figures that differ between router pods.
    `in_flight` is its open calls averaged since its last write (else they are counted now)."""
    service = summary["service"]
    replicas = list(summary["replicas"].values())
    if in_flight is None:
        in_flight = sum(r["in_flight"] for r in replicas)
    return {
        "requestRate": round(service["total_request_rate"], 2),
        "errorRate": round(service["error_rate"], 4),
        "p50LatencyMs": _ms(service["p50_latency"]),
        "p95LatencyMs": _ms(service["p95_latency"]),
        "p99LatencyMs": _ms(service["p99_latency"]),
        "inFlight": in_flight,
        "tokenDigest": service.get("token_digest", ""),
        "replicas": {
            r["name"]: {
                "requestRate": round(r["request_rate"], 2),
                "p50LatencyMs": _ms(r["p50_latency"]),
                "inFlight": r["in_flight"],
            }
            for r in replicas
        },
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _weighted(pairs: Iterable[tuple[float, float]]) -> float:
    """Mean of values weighted by request rate; the plain mean when there is no traffic."""
    pairs = list(pairs)
    total = sum(w for w, _ in pairs)
    if total > 0:
        return sum(w * v for w, v in pairs) / total
    return sum(v for _, v in pairs) / len(pairs) if pairs else 0.0


def combine(shares: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Service-wide figures from every router's share (taken in pod-name order, so every
    router computes the same floats from the same shares)."""
    ordered = [shares[name] for name in sorted(shares)]
    rate = sum(s["requestRate"] for s in ordered)
    return {
        "requestRate": round(rate, 2),
        "errorRate": round(_weighted((s["requestRate"], s["errorRate"]) for s in ordered), 4),
        "p50LatencyMs": round(_weighted((s["requestRate"], s["p50LatencyMs"]) for s in ordered), 2),
        "p95LatencyMs": max((s["p95LatencyMs"] for s in ordered), default=0.0),
        "p99LatencyMs": max((s["p99LatencyMs"] for s in ordered), default=0.0),
        "inFlight": round(sum(s["inFlight"] for s in ordered), 1),
    }


def _replica_figures(name: str, shares: list[Mapping[str, Any]]) -> dict[str, Any]:
    parts = [s["replicas"][name] for s in shares if name in s["replicas"]]
    return {
        "requestRate": round(sum(p["requestRate"] for p in parts), 2),
        "p50LatencyMs": round(_weighted((p["requestRate"], p["p50LatencyMs"]) for p in parts), 2),
        "inFlight": sum(p["inFlight"] for p in parts),
    }


def status_patch(
    summary: Mapping[str, Any],
    me: str,
    peers: Mapping[str, Any] | None = None,
    live: set[str] | None = None,
    in_flight: float | None = None,
) -> dict[str, Any]:
    """The router-owned status fields, as one merge patch (without timestamps).

    `me` is this router's pod name, `peers` the `status.routers` map as last seen, `live` the
    router pods that exist now (None when not known yet: then nothing is pruned). Shares of
    router pods that are gone are left out of the totals and removed from the map.
    """
    mine = share(summary, in_flight)
    peers = peers or {}
    alive = live if live is not None and me in live else None
    shares = {
        name: {**_ZERO, **_unstamped(s)}
        for name, s in peers.items()
        if name != me and isinstance(s, Mapping) and (alive is None or name in alive)
    }
    shares[me] = mine
    ordered = [shares[name] for name in sorted(shares)]
    replicas = list(summary["replicas"].values())
    metrics = {
        **combine(shares),
        "queueDepth": sum(r["queue_depth"] for r in replicas),
        "activeSessions": summary["service"]["total_sessions"],
        "replicas": [
            {
                "name": r["name"],
                "index": r["index"],
                "state": r["state"],
                **_replica_figures(r["name"], ordered),
                "queueDepth": r["queue_depth"],
                "sessions": r["assigned_sessions"],
                "tokenDigest": r.get("token_digest", ""),
            }
            for r in replicas
        ],
    }
    routers: dict[str, Any] = {me: mine}
    if alive is not None:
        routers.update({name: None for name in peers if name not in alive})
    return {
        "healthyReplicas": summary["service"]["healthy_replicas"],
        "metrics": metrics,
        "routers": routers,
    }


def already_written(patch: Mapping[str, Any], status: Mapping[str, Any] | None) -> bool:
    """Does `status` already hold everything `patch` would write (timestamps aside)?"""
    if not status:
        return False
    if status.get("healthyReplicas") != patch["healthyReplicas"]:
        return False
    if _unstamped(status.get("metrics") or {}) != patch["metrics"]:
        return False
    written = status.get("routers") or {}
    for name, entry in patch["routers"].items():
        if entry is None:
            if name in written:
                return False
        elif _unstamped(written.get(name) or {}) != entry:
            return False
    return True


def stamped(patch: Mapping[str, Any], now: str) -> dict[str, Any]:
    """`patch` with `lastUpdateTime` on the totals and on this router's share."""
    routers = {
        name: entry if entry is None else {**entry, _STAMP: now}
        for name, entry in patch["routers"].items()
    }
    return {**patch, "metrics": {**patch["metrics"], _STAMP: now}, "routers": routers}
