"""The `kubeforge` command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kubeforge._runtime import duration, json_arg
from kubeforge.local import LocalDeployment


def _serve(ns: argparse.Namespace) -> int:
    replica_flags = [
        "--max-concurrent-requests",
        str(ns.max_concurrent_requests),
        "--request-timeout",
        str(ns.request_timeout),
    ]
    dep = LocalDeployment(
        actor=ns.actor,
        replicas=ns.replicas,
        args=ns.args,
        kwargs=ns.kwargs,
        host=ns.host,
        port=ns.port,
        replica_flags=replica_flags,
        router_flags=["--health-poll-rate", str(ns.health_poll_rate)],
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(f"starting {ns.replicas} replicas of {ns.actor} ...", flush=True)
        url = dep.start(progress=lambda m: print(m, flush=True))
        print(f"kubeforge serving {ns.actor} at {url}  (Ctrl-C to stop)", flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kubeforge: {exc}", file=sys.stderr)
        return 1
    finally:
        dep.stop(grace=ns.grace)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubeforge", description="Replicated Python actors.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run N local replicas of an actor behind a router")
    s.add_argument("actor", help="package.module:Class")
    s.add_argument("--replicas", type=int, default=3)
    s.add_argument("--args", type=json_arg(list), default=[], help="JSON list of init args")
    s.add_argument("--kwargs", type=json_arg(dict), default={}, help="JSON object of init kwargs")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-concurrent-requests", type=int, default=10)
    s.add_argument("--request-timeout", default="60s")
    s.add_argument("--health-poll-rate", default="200ms")
    s.add_argument("--grace", type=duration, default=10.0, help="seconds to drain on Ctrl-C")
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    sys.exit(ns.func(ns))


if __name__ == "__main__":
    main()
