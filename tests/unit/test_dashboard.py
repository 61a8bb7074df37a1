"""The dashboard's queries name only metrics the routers and replicas expose, and cover every
figure a platform engineer looks for. (The e2e test runs them against a real Prometheus.)"""

import re

from examples.counter import Counter
from kubeforge.dashboard import PANELS, dashboard, queries
from kubeforge.replica.server import ReplicaConfig, ReplicaServer
from kubeforge.router import report
from kubeforge.router.discovery import StaticDiscovery
from kubeforge.router.engine import Router, RouterConfig


def exposed() -> set[str]:
    router = Router(RouterConfig(), StaticDiscovery([]))
    router.replica_added(0, "replica-0", "http://127.0.0.1:1")
    replica = ReplicaServer(ReplicaConfig(actor="examples.counter:Counter"), Counter)
    text = report.prometheus(router, 0.0).decode() + replica.prometheus().decode()
    return _names(text)


def _names(text: str) -> set[str]:
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_query_reads_an_exposed_metric() -> None:
    names = exposed()
    for title, expr in queries():
        used = set(re.findall(r"\b(kubeforge_\w+)", expr)) - {"kubeforge_service"}  # a label
        assert used and used <= names, (title, used - names)


def test_the_panels_cover_what_the_issue_lists() -> None:
    titles = " ".join(p.title.lower() for p in PANELS)
    for figure in (
        "request rate",
        "errors",
        "latency",
        "in flight",
        "queue",
        "sessions",
        "healthy",
        "sessions moved",
        "retries",
        "desired",
    ):
        assert figure in titles, figure
    legends = [q.legend for p in PANELS for q in p.queries]
    assert {"p50", "p95", "p99"} <= set(legends)
    board = dashboard()
    assert [v["name"] for v in board["templating"]["list"]] == [
        "datasource",
        "namespace",
        "service",
    ]
    assert len(board["panels"]) == len(PANELS)
