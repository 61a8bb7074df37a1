"""The Grafana dashboard the chart ships, generated from one list of panels.

Each panel's PromQL reads what the routers and replicas expose on /metrics, with the labels the
chart's PodMonitor gives every target (`namespace`, `pod`, `kubeforge_service`). The e2e test
runs every query below against a real Prometheus scraping a real Service, so a renamed metric
fails a test instead of leaving an empty panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Every query of a Service's panels selects it by these; Grafana fills the variables.
SELECT = 'namespace="$namespace",kubeforge_service="$service"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def _quantile(q: float) -> Query:
    buckets = f"kubeforge_router_request_duration_seconds_bucket{{{SELECT}}}"
    return Query(
        f"histogram_quantile({q}, sum by (le) (rate({buckets}[{RATE}])))", f"p{int(q * 100)}"
    )


PANELS = (
    Panel(
        "Request rate",
        "reqps",
        (Query(f"sum(rate(kubeforge_router_requests_total{{{SELECT}}}[{RATE}]))", "calls/s"),),
        "Calls the routers relayed, per second.",
    ),
    Panel(
        "Errors",
        "reqps",
        (
            Query(
                f'sum(rate(kubeforge_router_requests_total{{{SELECT},outcome="error"}}[{RATE}]))',
                "errors/s",
            ),
        ),
        "Calls that ended in an error (the endpoint's own, or the router's).",
    ),
    Panel(
        "Latency",
        "s",
        (_quantile(0.5), _quantile(0.95), _quantile(0.99)),
        "As the routers saw it, queue wait at the replica included.",
    ),
    Panel(
        "In flight",
        "short",
        (Query(f"sum(kubeforge_router_in_flight{{{SELECT}}})", "open calls"),),
        "Calls open at the routers: running or queued at a replica (the autoscaler's load).",
    ),
    Panel(
        "Queue",
        "short",
        (Query(f"sum(kubeforge_replica_queue_depth{{{SELECT}}})", "queued"),),
        "Calls waiting for a slot at the replicas.",
    ),
    Panel(
        "Sessions",
        "short",
        (Query(f"sum(kubeforge_replica_sessions{{{SELECT}}})", "sessions"),),
    ),
    Panel(
        "Replicas: healthy, known, desired",
        "short",
        (
            Query(f"max(sum by (pod) (kubeforge_router_replica_healthy{{{SELECT}}}))", "healthy"),
            Query(
                f"max(count by (pod) (kubeforge_router_replica_healthy{{{SELECT}}}))", "replicas"
            ),
            Query(f"max(kubeforge_router_desired_replicas{{{SELECT}}})", "desired"),
        ),
        "Healthy and known as the routers see them, against the Service's spec.replicas.",
    ),
    Panel(
        "Sessions moved",
        "short",
        (
            Query(
                f"sum(increase(kubeforge_router_sessions_moved_total{{{SELECT}}}[5m]))",
                "moved in 5m",
            ),
        ),
        "Sessions re-pinned because their replica was lost.",
    ),
    Panel(
        "Retries",
        "reqps",
        (Query(f"sum(rate(kubeforge_router_retries_total{{{SELECT}}}[{RATE}]))", "retries/s"),),
        "Calls sent again to another replica after they failed to reach one.",
    ),
)


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(p.title, q.expr) for p in PANELS for q in p.queries]


def _variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "sort": 1,
    }


def dashboard() -> dict:
    panels = []
    for i, panel in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": q.expr, "legendFormat": q.legend}
                    for j, q in enumerate(panel.queries)
                ],
            }
        )
    return {
        "title": "kubeforge Service",
        "uid": "kubeforge-service",
        "tags": ["kubeforge"],
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                _variable("namespace", "label_values(kubeforge_router_requests_total, namespace)"),
                _variable(
                    "service",
                    'label_values(kubeforge_router_requests_total{namespace="$namespace"}, '
                    "kubeforge_service)",
                ),
            ]
        },
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
