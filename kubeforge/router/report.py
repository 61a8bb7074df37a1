"""What the router tells about itself: JSON metrics, torchforge's summary, Prometheus text.

Pure functions of the routing table and windows at a given instant, so they are tested
without sockets and the same numbers reach `/v1/metrics`, `/metrics` and the resource status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubeforge import prom
from kubeforge.metrics import merged_stats
from kubeforge.router.core import Replica, ReplicaState

if TYPE_CHECKING:
    from kubeforge.router.engine import Router


def replica_entry(r: Replica, now: float) -> dict[str, Any]:
    """One replica with torchforge's per-replica keys, plus state and percentiles."""
    stats = r.window.stats(now)
    active = r.active
    return {
        "index": r.index,
        "name": r.name,
        "url": r.url,
        "state": r.state.value,
        "reason": r.reason,
        "instance": r.instance,
        "total_requests": r.total_requests,
        "successful_requests": r.successful_requests,
        "failed_requests": r.failed_requests,
        "request_rate": stats.rate,
        "error_rate": stats.error_rate,
        "avg_latency": stats.avg_latency,
        "p50_latency": stats.p50,
        "p95_latency": stats.p95,
        "p99_latency": stats.p99,
        "active_requests": active,
        "in_flight": r.open_calls,
        "queue_depth": r.queued,
        "assigned_sessions": r.sessions,
        "capacity_utilization": min(1.0, active / r.max_concurrent),
        "ranks": r.ranks,
        "batches": batch_sizes(r.batches),
        "token_digest": r.token_digest,
    }


def batch_sizes(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per batched endpoint: batches run, calls they held, the mean and largest batch size
    (since the replica started, as its Prometheus histogram counts them)."""
    return {
        name: {
            **c,
            "avg_batch_size": c["calls"] / c["batches"] if c["batches"] else 0.0,
        }
        for name, c in sorted(counts.items())
    }


def summary(router: Router, now: float) -> dict[str, Any]:
    """torchforge's `get_metrics_summary()` shape: `service` totals and `replicas[idx]`."""
    entries = [replica_entry(r, now) for r in _ordered(router)]
    healthy = [e for e in entries if e["state"] == ReplicaState.HEALTHY.value]
    total_sessions = sum(e["assigned_sessions"] for e in entries)
    stats = merged_stats([r.window for r in _ordered(router)], now)
    service = {
        "total_sessions": total_sessions,
        "healthy_replicas": len(healthy),
        "total_replicas": len(entries),
        "total_request_rate": sum(e["request_rate"] for e in entries),
        "avg_queue_depth": _mean([e["queue_depth"] for e in healthy]),
        "avg_capacity_utilization": _mean([e["capacity_utilization"] for e in healthy]),
        "sessions_per_replica": total_sessions / len(entries) if entries else 0.0,
        "error_rate": stats.error_rate,
        "p50_latency": stats.p50,
        "p95_latency": stats.p95,
        "p99_latency": stats.p99,
        "sessions_moved": router.table.sessions_moved,
        "retries": router.retries_total,
        "window_seconds": stats.window_s,
        "batches": _merged_batches(entries),
        "token_digest": router.tokens.digest,
    }
    return {"service": service, "replicas": {e["index"]: e for e in entries}}


def metrics(router: Router, now: float) -> dict[str, Any]:
    """Everything: the summary plus the service-wide window as measured at the router."""
    out = summary(router, now)
    out["window"] = merged_stats([r.window for r in _ordered(router)], now).as_dict()
    # Which call path answers calls, and how many the native relay passed to Python.
    out["relay"] = (
        {"kind": "native", **router.native.counts()}
        if router.native is not None
        else {"kind": "python"}
    )
    # The settings this router runs with now (flags, or the Service resource it follows).
    cfg = router.config
    out["settings"] = {
        "health_poll_rate": cfg.health_poll_rate,
        "request_timeout": cfg.request_timeout,
        "retries": cfg.retries,
    }
    return out


def replicas(router: Router, now: float) -> list[dict[str, Any]]:
    return [replica_entry(r, now) for r in _ordered(router)]


def prometheus(router: Router, now: float) -> bytes:
    """The router's /metrics. Counters and histograms are cumulative since start, so that
    Prometheus's rate() and histogram_quantile() aggregate them across routers; gauges say
    what is true now. Names follow Prometheus's conventions (base units, `_total`, a `replica`
    label per replica pod); README lists them beside vLLM's and the Inference Extension's."""
    replicas = _ordered(router)
    entries = [replica_entry(r, now) for r in replicas]
    exp = prom.Exposition()

    def per_replica(name: str, kind: str, help_text: str, key: str) -> None:
        exp.family(name, kind, help_text, [({"replica": e["name"]}, e[key]) for e in entries])

    exp.family(
        "kubeforge_router_requests_total",
        "counter",
        "Calls relayed, by replica and outcome",
        [
            ({"replica": e["name"], "outcome": o}, e[k])
            for e in entries
            for o, k in (("ok", "successful_requests"), ("error", "failed_requests"))
        ],
    )
    exp.histogram(
        "kubeforge_router_request_duration_seconds",
        "Call latency as the router saw it, queue wait at the replica included",
        [({"replica": r.name}, r.durations) for r in replicas],
    )
    per_replica("kubeforge_router_in_flight", "gauge", "Calls this router has open", "in_flight")
    per_replica(
        "kubeforge_router_queue_depth", "gauge", "Queue depth the replica reported", "queue_depth"
    )
    per_replica("kubeforge_router_sessions", "gauge", "Sessions held", "assigned_sessions")
    exp.family(
        "kubeforge_router_replica_healthy",
        "gauge",
        "1 when the replica takes traffic (GET /v1/replicas says why not)",
        [({"replica": e["name"]}, int(e["state"] == "HEALTHY")) for e in entries],
    )
    exp.one(
        "kubeforge_router_desired_replicas",
        "gauge",
        "Replicas the Service asks for (its spec.replicas; else the replicas given)",
        router.desired_replicas if router.desired_replicas is not None else len(entries),
    )
    exp.one(
        "kubeforge_router_sessions_moved_total",
        "counter",
        "Sessions re-pinned because their replica was lost",
        router.table.sessions_moved,
    )
    exp.one(
        "kubeforge_router_retries_total",
        "counter",
        "Calls retried on another replica after they failed to reach one",
        router.retries_total,
    )
    return exp.render()


def _merged_batches(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every replica's batches of each endpoint, added up (the service row of the summary)."""
    totals: dict[str, dict[str, int]] = {}
    for e in entries:
        for name, c in e["batches"].items():
            t = totals.setdefault(name, {"batches": 0, "calls": 0, "largest": 0})
            t["batches"] += c["batches"]
            t["calls"] += c["calls"]
            t["largest"] = max(t["largest"], c["largest"])
    return batch_sizes(totals)


def _ordered(router: Router) -> list[Replica]:
    return sorted(router.table.replicas.values(), key=lambda r: r.index)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
