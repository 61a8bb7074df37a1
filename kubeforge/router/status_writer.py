"""The router's half of the Service's status: live metrics and healthy replicas.

The operator owns everything else in status; the router merge-patches only `metrics` and
`healthyReplicas`, at most every `interval` seconds and only when a figure changed, so a quiet
Service costs the API server nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeforge.router import report
from kubeforge.router.engine import Router
from kubeforge.router.k8s_discovery import GROUP, PLURAL, VERSION, api_client

log = logging.getLogger("kubeforge.router.status")


def status_patch(summary: dict[str, Any]) -> dict[str, Any]:
    """The status fields the router owns, from its metrics summary (pure)."""
    service = summary["service"]
    replicas = list(summary["replicas"].values())
    return {
        "healthyReplicas": service["healthy_replicas"],
        "metrics": {
            "requestRate": round(service["total_request_rate"], 2),
            "errorRate": round(service["error_rate"], 4),
            "p50LatencyMs": round(service["p50_latency"] * 1000, 2),
            "p95LatencyMs": round(service["p95_latency"] * 1000, 2),
            "p99LatencyMs": round(service["p99_latency"] * 1000, 2),
            "queueDepth": sum(r["queue_depth"] for r in replicas),
            "inFlight": sum(r["in_flight"] for r in replicas),
            "activeSessions": service["total_sessions"],
            "replicas": [
                {
                    "name": r["name"],
                    "index": r["index"],
                    "state": r["state"],
                    "requestRate": round(r["request_rate"], 2),
                    "p50LatencyMs": round(r["p50_latency"] * 1000, 2),
                    "inFlight": r["in_flight"],
                    "queueDepth": r["queue_depth"],
                    "sessions": r["assigned_sessions"],
                }
                for r in replicas
            ],
        },
    }


class StatusWriter:
    def __init__(self, router: Router, service: str, namespace: str, interval: float = 2.0) -> None:
        self.router = router
        self.service = service
        self.namespace = namespace
        self.interval = interval
        self.last: dict[str, Any] | None = None
        self.writes = 0

    async def run(self) -> None:
        api = await api_client()
        custom = client.CustomObjectsApi(api)
        try:
            while True:
                await asyncio.sleep(self.interval)
                patch = status_patch(report.summary(self.router, time.monotonic()))
                if patch == self.last:
                    continue
                stamped = {
                    **patch,
                    "metrics": {
                        **patch["metrics"],
                        "lastUpdateTime": datetime.datetime.now(datetime.UTC).strftime(
                            "%Y-%m-%dT%H:%M:%SZ"
                        ),
                    },
                }
                try:
                    await custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        self.service,
                        {"status": stamped},
                        _content_type="application/merge-patch+json",
                    )
                    self.last = patch
                    self.writes += 1
                except ApiException as exc:
                    log.warning(
                        "status write failed: %s %s %s",
                        exc.status,
                        exc.reason,
                        str(exc.body or "")[:300],
                    )
        finally:
            await api.close()
