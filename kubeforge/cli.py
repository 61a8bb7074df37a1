"""The `kubeforge` command: `run` a Service manifest locally, `call` it, watch its `status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from kubeforge import gpus
from kubeforge._runtime import duration, json_arg
from kubeforge.api import ManifestError, ServiceManifest, parse_manifest
from kubeforge.contract import (
    API_VERSION,
    CRD_NAME,
    GROUP,
    KIND,
    LABEL_PREFIX,
    PLURAL,
    SHORT_NAME,
    VERSION,
)
from kubeforge.errors import BroadcastError, KubeforgeError
from kubeforge.local import LocalDeployment, ReplicaSet
from kubeforge.settings import DEFAULTS

# Fields that mean something only to a cluster; `run` says it ignores them rather than pretend.
# `kubeforge status fsvc/NAME`: the names kubectl takes for the resource.
_RESOURCE_NAMES = (SHORT_NAME, PLURAL, CRD_NAME)
_CLUSTER_ONLY = (
    "image",
    "resources",
    "node_selector",
    "tolerations",
    "affinity",
    "image_pull_secrets",
    "priority_class_name",
    "runtime_class_name",
    "scheduler_name",
    "pod_template",
)


def load_manifest(path: str) -> ServiceManifest:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    services = [
        d
        for d in docs
        if isinstance(d, dict)
        and d.get("kind") == "Service"
        and str(d.get("apiVersion", "")).startswith(LABEL_PREFIX)
    ]
    if len(services) != 1:
        raise ManifestError(f"{path}: expected one kubeforge Service, found {len(services)}")
    return parse_manifest(services[0], path)


def _run(ns: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(ns.spec)
        spec = manifest.spec
        if spec.replicas < 1:
            raise ManifestError(f"{ns.spec}: spec.replicas is {spec.replicas}: nothing to run")
        if spec.hosts > 1:
            raise ManifestError(
                f"{ns.spec}: spec.hosts is {spec.hosts}: a local run has one host; replicas "
                "that span hosts need the operator on a cluster (procs works here)"
            )
        assigned = (
            gpus.assign(spec.replicas, spec.gpus_per_replica, gpus.visible_gpus())
            if spec.gpus_per_replica
            else None
        )
    except (ManifestError, gpus.GpuError) as exc:
        print(f"kubeforge: {exc}", file=sys.stderr)
        return 2
    ignored = [name for name in _CLUSTER_ONLY if getattr(spec, name)]
    if ignored:
        print(f"note: ignored when running locally: {', '.join(ignored)}", flush=True)
    env = {"KUBEFORGE_TOKEN": ns.token} if ns.token else {}
    deployment = LocalDeployment(
        ReplicaSet(
            actor=spec.actor,
            replicas=spec.replicas,
            args=spec.args,
            kwargs=spec.kwargs,
            host=ns.host,
            gpus=assigned,
            ranks=spec.procs,
            env={**env, **{e["name"]: str(e.get("value", "")) for e in spec.env if "name" in e}},
            flags=spec.replica_flags(),
        ),
        port=ns.port,
        router_flags=spec.router_flags(),
        env=env,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    name = manifest.metadata.name
    try:
        print(f"starting {name}: {spec.replicas} replicas of {spec.actor} ...", flush=True)
        url = deployment.start(timeout=ns.startup_timeout, progress=lambda m: print(m, flush=True))
        print(f"kubeforge: {name} is serving at {url}  (Ctrl-C to stop)", flush=True)
        stop.wait()
        print(f"stopping {name} (grace {ns.grace:g}s) ...", flush=True)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kubeforge: {exc}", file=sys.stderr)
        return 1
    finally:
        deployment.stop(grace=ns.grace)
    print("stopped", flush=True)
    return 0


def _value(text: str) -> Any:
    """A CLI argument: JSON when it parses (3, true, [1,2], "x"), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call(ns: argparse.Namespace) -> int:
    from kubeforge.client import ServiceClient

    async def go() -> Any:
        async with ServiceClient(ns.url, token=ns.token, timeout=ns.timeout) as client:
            handle = getattr(client, ns.endpoint)
            args = [_value(a) for a in ns.args]
            if ns.all:
                return await handle.fanout(*args, **ns.kwargs)
            if ns.stream:  # each item on its own line, as it comes
                async for item in handle.stream(*args, sess_id=ns.session, **ns.kwargs):
                    print(json.dumps(item, default=str), flush=True)
                return _STREAMED
            return await handle.route(*args, sess_id=ns.session, **ns.kwargs)

    try:
        result = asyncio.run(go())
    except BroadcastError as exc:
        print(
            json.dumps(
                {
                    "results": exc.results,
                    "replicas": exc.replicas,
                    "errors": {k: str(v) for k, v in exc.errors.items()},
                },
                indent=2,
            )
        )
        return 1
    except KubeforgeError as exc:
        print(f"kubeforge: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result is not _STREAMED:
        print(json.dumps(result, indent=2, default=str))
    return 0


_STREAMED = object()  # `call --stream` printed its items already


def status_table(replicas: list[dict[str, Any]]) -> str:
    header = (
        f"{'REPLICA':<12} {'STATE':<10} {'IN-FLIGHT':>9} {'QUEUE':>6} {'SESSIONS':>8} "
        f"{'REQ/S':>9} {'P50 MS':>8}  REASON"
    )
    lines = [header]
    for r in replicas:
        lines.append(
            f"{r['name']:<12} {r['state']:<10} {r['in_flight']:>9} {r['queue_depth']:>6} "
            f"{r['assigned_sessions']:>8} {r['request_rate']:>9.1f} "
            f"{r['p50_latency'] * 1000:>8.2f}  {r.get('reason', '')}"
        )
    return "\n".join(lines)


def service_table(body: dict[str, Any]) -> str:
    """A Service on a cluster, from its status: the counts, the autoscaler's last decision,
    and the replicas as its routers publish them (pods not serving yet, from the operator)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    lines = [
        f"{body['metadata']['name']}: desired {spec.get('replicas', 0)}, "
        f"replicas {status.get('replicas', 0)}, ready {status.get('readyReplicas', 0)}, "
        f"healthy {status.get('healthyReplicas', 0)}, updated {status.get('updatedReplicas', 0)}"
        f" ({ready.get('reason', 'no status yet')})"
    ]
    scaler = status.get("autoscaler")
    if spec.get("autoscaling"):
        last = "no decision yet"
        if scaler:
            when = scaler.get("lastScaleTime") or ""
            last = f"{scaler.get('reason', '')} {when}: {scaler.get('message', '')}".strip()
        lines.append(f"autoscaler: {last}")
    metrics = status.get("metrics") or {}
    served = {r["name"]: r for r in metrics.get("replicas") or []}
    rows = [
        {
            "name": name,
            "state": r.get("state", ""),
            "in_flight": r.get("inFlight", 0),
            "queue_depth": r.get("queueDepth", 0),
            "assigned_sessions": r.get("sessions", 0),
            "request_rate": r.get("requestRate", 0.0),
            "p50_latency": r.get("p50LatencyMs", 0.0) / 1000,
        }
        for name, r in served.items()
    ]
    for pod in status.get("replicaStatuses") or []:
        if pod.get("pod") not in served:
            state = pod.get("phase", "").upper() or "PENDING"
            rows.append(
                {
                    "name": pod.get("pod", ""),
                    "state": state,
                    "in_flight": 0,
                    "queue_depth": 0,
                    "assigned_sessions": 0,
                    "request_rate": 0.0,
                    "p50_latency": 0.0,
                    "reason": pod.get("reason", ""),
                }
            )
    return "\n".join([*lines, status_table(rows)])


async def _fetch_service(target: str, namespace: str | None) -> dict[str, Any]:
    """The Service resource `fsvc/NAME`, with the kubeconfig's credentials (and namespace)."""
    from kubernetes_asyncio.client import CustomObjectsApi

    from kubeforge.kube import api_client

    namespace = await _namespace_of(namespace)
    api = await api_client()
    try:
        return await CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, target.split("/", 1)[1]
        )
    finally:
        await api.close()


def _status(ns: argparse.Namespace) -> int:
    from kubernetes_asyncio.client.exceptions import ApiException

    from kubeforge.client import ServiceClient

    on_cluster = ns.url.split("/", 1)[0] in _RESOURCE_NAMES and "/" in ns.url

    async def fetch() -> str:
        if on_cluster:
            return service_table(await _fetch_service(ns.url, ns.namespace))
        async with ServiceClient(ns.url, token=ns.token, timeout=5.0) as client:
            return status_table(await client.replicas())

    live = not ns.once and sys.stdout.isatty()
    try:
        while True:
            try:
                table = asyncio.run(fetch())
            except (KubeforgeError, ApiException, OSError) as exc:
                table = f"kubeforge: {getattr(exc, 'reason', None) or exc}"
                if not live:
                    print(table, file=sys.stderr)
                    return 1
            if live:
                print("\033[H\033[2J" + time.strftime("%H:%M:%S ") + ns.url, flush=False)
            print(table, flush=True)
            if not live:
                return 0
            time.sleep(ns.interval)
    except KeyboardInterrupt:
        return 0


async def _namespace_of(namespace: str | None) -> str:
    """The namespace asked for, else the kubeconfig's current one, else "default"."""
    from kubernetes_asyncio import config

    if namespace is not None:
        return namespace
    try:
        contexts = await config.list_kube_config_contexts()
        return (contexts[1] or {}).get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError):
        return "default"


def _rotate_token(ns: argparse.Namespace) -> int:
    from kubernetes_asyncio.client.exceptions import ApiException

    from kubeforge.rotate import rotate
    from kubeforge.tokens import RotationError

    name = ns.service.split("/", 1)[1] if "/" in ns.service else ns.service

    async def go() -> None:
        namespace = await _namespace_of(ns.namespace)
        await rotate(
            name, namespace, ns.token, ns.grace, ns.timeout, lambda s: print(s, flush=True)
        )

    try:
        asyncio.run(go())
    except ApiException as exc:
        print(f"kubeforge: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except (RotationError, TimeoutError, OSError) as exc:
        print(f"kubeforge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "kubeforge: stopped; both tokens are still accepted: run again to go on",
            file=sys.stderr,
        )
        return 130
    return 0


def _operator(ns: argparse.Namespace) -> int:
    import asyncio as _asyncio

    import kopf

    from kubeforge.operator import handlers  # registers the handlers

    namespaces = [] if ns.all_namespaces else (ns.namespace or ["default"])
    settings = kopf.OperatorSettings()
    # An operator of named namespaces scans nothing cluster-wide (resource definitions,
    # namespaces): a namespaced install grants it nothing outside its namespaces.
    settings.scanning.disabled = not ns.all_namespaces
    handlers.defaults(network_policy=ns.network_policy, tls=ns.tls)
    _asyncio.run(
        kopf.operator(
            settings=settings,
            standalone=True,
            clusterwide=ns.all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=ns.liveness,
        )
    )
    return 0


def _crd(ns: argparse.Namespace) -> int:
    from kubeforge.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubeforge", description="Replicated Python actors.")
    sub = p.add_subparsers(dest="command", required=True)
    token = os.environ.get("KUBEFORGE_TOKEN")

    r = sub.add_parser("run", help="serve a Service manifest locally until Ctrl-C")
    r.add_argument("spec", help=f"a YAML file with a {API_VERSION} {KIND}")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=DEFAULTS.router_port)
    r.add_argument("--token", default=token, help="require this token (default $KUBEFORGE_TOKEN)")
    r.add_argument("--startup-timeout", type=duration, default=DEFAULTS.startup_timeout)
    r.add_argument(
        "--grace", type=duration, default=DEFAULTS.stop_grace, help="drain time on Ctrl-C"
    )
    r.set_defaults(func=_run)

    c = sub.add_parser("call", help="call an endpoint through a router")
    c.add_argument("url")
    c.add_argument("endpoint")
    c.add_argument("args", nargs="*", help="arguments: JSON values, else strings")
    c.add_argument("--kwargs", type=json_arg(dict), default={}, help="JSON object")
    c.add_argument("--session", help="a session id from POST /v1/sessions")
    c.add_argument("--all", action="store_true", help="broadcast to every healthy replica")
    c.add_argument(
        "--stream", action="store_true", help="a streaming endpoint: print items as they come"
    )
    c.add_argument("--token", default=token)
    c.add_argument("--timeout", type=duration, default=300.0)
    c.set_defaults(func=_call)

    s = sub.add_parser(
        "status", help="a live table of a router's replicas, or of a Service on a cluster"
    )
    s.add_argument("url", help="a router URL, or fsvc/NAME (read with your kubeconfig)")
    s.add_argument("-n", "--namespace", help="of fsvc/NAME (default: the kubeconfig's)")
    s.add_argument("--once", action="store_true", help="print once and exit")
    s.add_argument("--interval", type=duration, default=1.0)
    s.add_argument("--token", default=token)
    s.set_defaults(func=_status)

    t = sub.add_parser(
        "rotate-token", help="give a Service on a cluster a new token, refusing no call"
    )
    t.add_argument("service", help="NAME or fsvc/NAME (read with your kubeconfig)")
    t.add_argument("-n", "--namespace", help="default: the kubeconfig's")
    t.add_argument("--token", help="the new token (default: a random one)")
    t.add_argument(
        "--grace",
        type=duration,
        default=300.0,
        help="how long callers keep the old token once the new one is in the Secret",
    )
    t.add_argument("--timeout", type=duration, default=600.0, help="for the pods to load each step")
    t.set_defaults(func=_rotate_token)

    o = sub.add_parser("operator", help="run the kopf operator that reconciles Services")
    o.add_argument("-A", "--all-namespaces", action="store_true")
    o.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeat)")
    o.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8081/healthz")
    o.add_argument(
        "--no-network-policy",
        dest="network_policy",
        action="store_false",
        help="write no NetworkPolicies for Services that do not ask (spec.networkPolicy.enabled)",
    )
    o.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="plain HTTP to replicas for Services that do not say (spec.tls.enabled)",
    )
    o.set_defaults(func=_operator)

    d = sub.add_parser("crd", help="print the Service CustomResourceDefinition (YAML)")
    d.set_defaults(func=_crd)
    return p


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    sys.exit(ns.func(ns))


if __name__ == "__main__":
    main()
