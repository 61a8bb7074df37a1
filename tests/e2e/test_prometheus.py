"""A real Prometheus (built from its Go module by `make k8s-bin`) scrapes a Service's router and
replicas, discovered through the Kubernetes API with the chart's PodMonitor relabelings; every
dashboard query returns data, and the autoscaler's count agrees with the load Prometheus saw."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge import ServiceClient
from kubeforge.dashboard import RATE, queries
from tests.e2e.conftest import Operator
from tests.e2e.test_autoscale import SLOW, Load, _until
from tests.e2e.test_chart import render
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import _token, deploy, fsvc, router_url

pytestmark = pytest.mark.timeout(300)


def prometheus_binary(cluster: Any) -> str:
    control = getattr(cluster, "control", None)
    binary = str(control.bins / "prometheus") if control else shutil.which("prometheus")
    if binary is None or not Path(binary).exists():
        pytest.fail("no prometheus: run `make k8s-bin` (it builds it) and put its bin dir on PATH")
    return binary


def scrape_config(cluster: Any, namespace: str) -> dict[str, Any]:
    """The scrape jobs the Prometheus Operator makes of the chart's PodMonitor, one per
    endpoint: pods selected by component, the endpoint's port, scheme and TLS settings, the
    operator's own target labels, then the chart's relabelings."""
    monitor = next(
        d
        for d in render(cluster, "monitoring.podMonitor.enabled=true")
        if d["kind"] == "PodMonitor"
    )
    wanted = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    jobs = []
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        relabel = [
            {
                "source_labels": ["__meta_kubernetes_pod_label_kubeforge_dev_component"],
                "regex": "|".join(wanted),
                "action": "keep",
            },
            {
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
                "action": "keep",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ]
        relabel += [
            {"source_labels": r["sourceLabels"], "target_label": r["targetLabel"]}
            for r in endpoint["relabelings"]
        ]
        tls = endpoint.get("tlsConfig", {})
        jobs.append(
            {
                "job_name": f"kubeforge-{endpoint['port']}",
                "metrics_path": endpoint["path"],
                "scheme": endpoint.get("scheme", "http"),
                "tls_config": {"insecure_skip_verify": tls.get("insecureSkipVerify", False)},
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "kubeconfig_file": str(cluster.kubeconfig),
                        "namespaces": {"names": [namespace]},
                    }
                ],
                "relabel_configs": relabel,
            }
        )
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": jobs,
    }


class Prometheus:
    def __init__(self, binary: str, config: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubeforge-prometheus-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = (self.dir / "log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus(cluster: Any, namespace: str) -> Iterator[Prometheus]:
    prom = Prometheus(prometheus_binary(cluster), scrape_config(cluster, namespace))
    try:
        yield prom
    finally:
        prom.stop()


def scraper_address(cluster: Any) -> str:
    """This machine's address as the cluster's pods see it (on kind, its address on the
    node's network; on the process node, loopback)."""
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    node_ip = next(
        a["address"] for a in nodes[0]["status"]["addresses"] if a["type"] == "InternalIP"
    )
    route = subprocess.run(
        ["ip", "-o", "route", "get", node_ip], capture_output=True, text=True, check=True
    ).stdout.split()
    return route[route.index("src") + 1]


async def test_prometheus_scrapes_and_every_dashboard_query_has_data(
    cluster: Any, namespace: str, operator: Operator, prometheus: Prometheus
) -> None:
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetInFlight": 2,
        "scaleUpDelay": "3s",
        "scaleDownDelay": "5m",
    }
    # Prometheus runs on this machine, outside the pod network: the replicas' NetworkPolicy
    # lets it in as a user lets their scraper in (spec.networkPolicy.replicaFrom).
    allow = {"replicaFrom": [{"ipBlock": {"cidr": f"{scraper_address(cluster)}/32"}}]}
    deploy(
        cluster,
        namespace,
        "scraped",
        2,
        gpus=0,
        autoscaling=autoscaling,
        networkPolicy=allow,
        **SLOW,
    )
    url = router_url(cluster, namespace, "scraped")

    def targets_up() -> bool:
        """the router and the replicas are scraped"""
        active = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        up = {t["labels"].get("component") for t in active if t["health"] == "up"}
        return up == {"router", "replica"}

    wait_for(targets_up, 60)
    async with ServiceClient(url, token=_token(cluster, namespace, "scraped")) as client:
        sid = await client.start_session()
        await client.work(sid, 0.01)
        load = Load(client, 8)
        await _until(
            lambda: fsvc(cluster, namespace, "scraped")["spec"]["replicas"] == 3,
            60,
            "did not grow to 3 replicas",
            lambda: fsvc(cluster, namespace, "scraped").get("status"),
        )
        await asyncio.sleep(8)  # a few scrapes of the grown Service
        select = {"$namespace": namespace, "$service": "scraped", RATE: "30s"}
        empty = []
        for title, expr in queries():
            for var, value in select.items():
                expr = expr.replace(var, value)
            if not prometheus.query(expr):
                empty.append((title, expr))
        assert empty == [], empty
        # The autoscaler's count is what the load Prometheus shows asks for: averaged over the
        # last scrapes, as the autoscaler averages it (one scrape's instant can fall between
        # a caller's calls; one run saw 3 of 8 in flight that way).
        in_flight = (
            f'kubeforge_router_in_flight{{namespace="{namespace}",kubeforge_service="scraped"}}'
        )
        seen = float(prometheus.query(f"avg_over_time(sum({in_flight})[8s:1s])")[0]["value"][1])
        wanted = max(1, min(3, math.ceil(seen / 2)))
        assert fsvc(cluster, namespace, "scraped")["spec"]["replicas"] == wanted == 3, seen
        desired = prometheus.query(
            f'max(kubeforge_router_desired_replicas{{namespace="{namespace}"}})'
        )
        assert float(desired[0]["value"][1]) == 3
        await load.stop()
        assert load.errors == [], load.errors[:3]
    print(f"prometheus: {len(queries())} dashboard queries with data; load {seen:g} -> 3 replicas")
