"""How tests and clients reach a Service on the process node, where there is no kube-proxy.

On a real cluster that is the Service's EndpointSlices. Here pods have loopback addresses
(127.0.0.x) and the API server refuses those in EndpointSlices ("may not be in the loopback
range"), so the slices stay empty. This resolves a Service the way the EndpointSlice
controller would: its selector's ready pods, at each port's targetPort.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def _target_port(pod: dict[str, Any], target: int | str) -> int | None:
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod["spec"]["containers"]:
        for port in container.get("ports", []):
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


def service_endpoints(
    kubectl: Callable[..., Any], namespace: str, name: str, port: str | int | None = None
) -> list[str]:
    """`ip:port` of every ready pod behind the Service (its first port unless named)."""
    svc = json.loads(kubectl("get", "service", name, "-n", namespace, "-o", "json").stdout)
    selector = svc["spec"].get("selector") or {}
    if not selector:
        return []
    ports = svc["spec"]["ports"]
    chosen = next((p for p in ports if port in (p.get("name"), p["port"])), ports[0])
    target = chosen.get("targetPort", chosen["port"])
    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", labels, "-o", "json").stdout)[
        "items"
    ]
    out = []
    for pod in pods:
        number = _target_port(pod, target)
        ip = pod.get("status", {}).get("podIP")
        if _ready(pod) and ip and number:
            out.append(f"{ip}:{number}")
    return sorted(out)
