"""`python -m kubeforge.router --replica URL [--replica URL ...] [--port 8080]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from kubeforge import _runtime, tls, tokens
from kubeforge.router.discovery import StaticDiscovery
from kubeforge.router.engine import RouterConfig
from kubeforge.router.server import RouterServer
from kubeforge.settings import DEFAULTS, router_request_timeout

log = logging.getLogger("kubeforge.router")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kubeforge.router", description=__doc__)
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="a replica's base URL (repeat; the order fixes replica indexes)",
    )
    p.add_argument("--service", help="Kubernetes discovery: the kubeforge Service's name")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument(
        "--host", default=None, help="bind address (default $KUBEFORGE_BIND_HOST or 0.0.0.0)"
    )
    p.add_argument("--port", type=int, default=DEFAULTS.router_port)
    p.add_argument(
        "--health-poll-rate",
        type=_runtime.duration,
        default=DEFAULTS.health_poll_rate,
        help="seconds between health checks of each replica, e.g. 200ms",
    )
    p.add_argument("--health-timeout", type=_runtime.duration, default=DEFAULTS.health_timeout)
    p.add_argument(
        "--request-timeout",
        type=_runtime.duration,
        default=router_request_timeout(DEFAULTS.request_timeout),
        help="longest a relayed call may take, e.g. 2m (a little over the replicas' limit)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULTS.retries,
        help="re-sends of a call that failed without an answer (0: never)",
    )
    p.add_argument("--max-body", type=int, default=DEFAULTS.max_body, help="bytes")
    p.add_argument(
        "--tls-server-name",
        help="with $KUBEFORGE_TLS_DIR: the name replicas must prove (default: the --service's)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    _runtime.setup_logging("router")
    if ns.service:
        from kubeforge.router.k8s_discovery import KubernetesDiscovery, router_settings

        def follow(spec: dict[str, object]) -> None:
            server.follow(router_settings(spec))
            if isinstance(spec.get("replicas"), int):
                server.router.desired_replicas = spec["replicas"]

        k8s = KubernetesDiscovery(ns.service, ns.namespace, on_settings=follow)
        discovery: object = k8s
    elif not ns.replica:
        sys.exit("kubeforge.router: give --replica URL (repeatable) or --service NAME")
    else:
        try:
            discovery = StaticDiscovery(ns.replica)
        except ValueError as exc:
            sys.exit(f"kubeforge.router: {exc}")
    initial, token_dir = tokens.from_environ()
    tls_dir, upstream_tls = tls.directory(), None
    if tls_dir is not None:  # replicas serve TLS with the Service's certificate
        name = ns.tls_server_name or (ns.service and tls.server_name(ns.service, ns.namespace))
        if not name:
            sys.exit("kubeforge.router: with KUBEFORGE_TLS_DIR, give --tls-server-name")
        upstream_tls = tls.client(tls_dir, name)
    config = RouterConfig(
        host=_runtime.bind_host(ns.host),
        port=ns.port,
        health_poll_rate=ns.health_poll_rate,
        health_timeout=ns.health_timeout,
        request_timeout=ns.request_timeout,
        retries=ns.retries,
        max_body=ns.max_body,
        tokens=initial,
        tls=upstream_tls,
    )
    server = RouterServer(config, discovery)  # type: ignore[arg-type]

    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        port = await server.start()
        if token_dir is not None:  # a rotation reaches us through the mounted Secret
            follow = tokens.follow(token_dir, initial, server.router.use)
            tasks.append(asyncio.get_running_loop().create_task(follow))
        if ns.service:
            from kubeforge.router.status_writer import StatusWriter

            writer = StatusWriter(
                server.router,
                ns.service,
                ns.namespace,
                os.environ.get("KUBEFORGE_ROUTER_NAME") or socket.gethostname(),
                observed=lambda: k8s.status,
                live_routers=lambda: k8s.routers,
            )
            tasks.append(asyncio.get_running_loop().create_task(writer.run()))
        log.info(
            "router on %s:%d over %d replicas (%d healthy)",
            config.host,
            port,
            len(server.router.table.replicas),
            len(server.router.table.healthy),
        )

    _runtime.run(start, server.stop)


if __name__ == "__main__":
    main()
