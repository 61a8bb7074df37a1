"""Router overhead benchmark: what does putting kubeforge's router in front of replicas cost?

Starts three no-op replicas (``examples.echo:Echo``) and drives the same tiny request
(``POST /v1/call/echo`` with ``{"args": ["x"], "kwargs": {}}``) with wrk against, the way a
user runs each (the token on, the router's health polling on):

* direct       -- the replicas themselves (one wrk per replica, connections split three ways);
                  the floor any proxy is measured against;
* nginx        -- nginx as a reverse proxy (least_conn, upstream keep-alive as its docs advise);
* haproxy      -- HAProxy in HTTP mode (leastconn, keep-alive both ways, `http-reuse always`);
* kf-router    -- ``python -m kubeforge.router`` over the same replicas;
* kf-router/s  -- the same router with every call in a session (SESSIONS of them, in turn);
* nginx/s      -- the same session calls through nginx, sticky by hashing the same header;
* kf-router+tls, nginx+tls -- with ``--tls``: the same router and nginx over three more
                  replicas that serve TLS 1.3 with a certificate of a CA made for the run
                  (kubeforge.tls, as the operator makes one per Service); both verify it and
                  keep connections alive. The callers' side stays plain, as in a cluster.
* vllm-router  -- the Rust router from PyPI (``vllm-router``), if installed. It serves these
                  calls through its transparent-proxy fallback (it parses and re-serialises the
                  JSON), a different path from the others: shown for reference, not compared.

Every proxy runs for the whole benchmark; ``--rounds`` (5) interleaved rounds measure them in
an order that rotates each round, and each point reports the median req/s with its min and max,
the median p50/p99, and the proxy's CPU per call (its /proc ticks over the calls it served): the
figure that does not depend on how the scheduler shared the two cores. A point with any non-2xx
answer or socket error is invalid: its ratios print n/a. ``--pin`` runs the proxy alone on core
0 and the replicas and wrk on core 1 (taskset), so the figure is the proxy's capacity, not what
it takes from the replicas. The peers' versions are printed and in the ``RESULT`` JSON line.

Usage: ``.venv/bin/python bench/router_overhead.py [--duration 10] [--connections 16,64]
[--rounds 5] [--quick] [--pin] [--threads 1] [--token T | --no-token] [--tls]``. Needs ``wrk``,
``nginx`` and ``haproxy`` on PATH (Debian: ``apt-get install -y wrk nginx-light haproxy``, which
``make bench-deps`` does) and optionally ``pip install vllm-router``.

Notes on the external tools (checked with wrk 4.1.0, nginx 1.22.1, vllm-router 0.1.17):

* vllm-router ships a console script ``vllm-router`` and the module
  ``vllm_router.launch_router`` (a thin Python wrapper around the Rust ``vllm_router_rs``
  extension). As a plain HTTP load balancer over static workers::

      python -m vllm_router.launch_router --worker-urls http://127.0.0.1:P1 http://... \\
          --host 127.0.0.1 --port P --policy round_robin \\
          --worker-startup-check-interval 1 --prometheus-port FREE_PORT --log-level warning

  ``--worker-urls`` takes several URLs after one flag. Before it binds its port it polls
  ``GET /health`` on every worker every ``--worker-startup-check-interval`` seconds (default
  30: set 1 or start-up takes up to 30 s; ``--worker-startup-timeout-secs`` defaults to 600).
  It is ready once its own ``GET /health`` answers 200 ("All servers healthy"); the port is
  only opened after all workers were seen healthy. It always starts a Prometheus exporter on
  ``--prometheus-port`` (default 29000, so give it a free port). Unknown paths such as
  ``POST /v1/call/echo`` (and ``GET /readyz``) are forwarded to a worker, but the client's
  ``Authorization`` header is NOT passed on: it sends ``Authorization: Bearer <--api-key>``
  instead, so with ``--token`` it gets ``--api-key TOKEN``. Its default policy is
  ``cache_aware``; round_robin is the cheapest plain balancer. Runtime health checks run
  every 60 s by default. ``--log-level`` does not silence its start-up INFO lines, but it
  logs nothing per request.
* nginx runs in the foreground from a throwaway prefix:
  ``nginx -p TMP -c TMP/nginx.conf -g 'daemon off;'``; pid file, temp paths and error log
  all point into TMP, so nothing under /etc/nginx or /var is used and nothing is left running.
  ``user root;`` is set when run as root so workers can use the temp dir.
* wrk: ``wrk -t T -c C -d Ds --latency --timeout 10s -s req.lua URL``; the Lua script sets
  ``wrk.method``, ``wrk.body`` and ``wrk.headers``. ``--latency`` prints the 50/75/90/99%
  lines (units us/ms/s/m); non-2xx-or-3xx answers appear as "Non-2xx or 3xx responses: N" and
  transport failures as "Socket errors: connect N, read N, write N, timeout N".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from figures import CDF_PERCENTILES, add_json_arg, emit, median_curve

from kubeforge import tls
from kubeforge.local import free_port

ROOT = Path(__file__).resolve().parent.parent
N_REPLICAS = 3
CALL_PATH = "/v1/call/echo"
CALL_BODY = '{"args": ["x"], "kwargs": {}}'
WARMUP_S = 1
WRK_TIMEOUT = "10s"
WRK_PREFIX: list[str] = []  # `taskset -c 1` when the proxy has core 0 to itself (--pin)
# nginx's stickiness for calls in sessions: the same header the router reads, hashed.
HASH_ON_SESSION = "hash $http_x_kubeforge_session consistent;"
# Enough sessions that hashing spreads them over the 3 replicas as the router does (it places
# each on the least-loaded): with 3, a hash may put two on one replica and leave one idle, and
# on 2 cores fewer busy replicas is faster, which measured the hash's luck, not the proxy.
SESSIONS = 30

NGINX_CONF = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream replicas {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{proxy_tls}        }}
    }}
}}
"""


def nginx_conf(tmp: Path, servers: list[str], port: int, proxy_tls: str = "") -> str:
    """One nginx config for every bench that puts nginx in front of replicas, so a new
    placeholder cannot leave one of them behind (streams.py once failed on a missing key)."""
    return NGINX_CONF.format(
        user="user root;\n" if os.geteuid() == 0 else "",
        tmp=tmp,
        servers="\n".join(f"        server {s};" for s in servers),
        port=port,
        proxy_tls=proxy_tls,
    )


# nginx to replicas that serve TLS: verified against the run's CA and the Service's name, as
# the router does; upstream connections kept alive (and TLS sessions reused) as for plain.
NGINX_TLS = """            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
"""


class StartError(RuntimeError):
    """A process under test did not become ready."""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    proxy_user_us: float | None = None  # CPU the proxy spent per request, user space
    proxy_sys_us: float | None = None  # ... and in the kernel (its syscalls)
    cdf_ms: list[float] = field(default_factory=list)  # latency at figures.CDF_PERCENTILES

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{text}")
    lat: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        lat[pct] = _to_ms(value, unit)
    total = re.search(r"^\s+(\d+) requests in", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    cdf = [float(us) / 1e3 for us in re.findall(r"^CDF \S+ (\d+)$", text, re.M)]
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=lat.get("50", float("nan")),
        p99_ms=lat.get("99", float("nan")),
        requests=int(total.group(1)) if total else 0,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        cdf_ms=cdf if len(cdf) == len(CDF_PERCENTILES) else [],
    )


class Procs:
    """Processes started by the benchmark, each in its own process group."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the proc
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # own group for cleanup, same session: one scheduler autogroup
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure nothing else in its group survives it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def wait_ready(
        self,
        name: str,
        url: str,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StartError(
                    f"{name} exited with code {proc.returncode} before ready\n"
                    + self.log_tail(name)
                )
            req = urllib.request.Request(url, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=1.0, context=context) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.1)
        raise StartError(
            f"{name} not ready at {url} after {timeout_s:.0f}s ({last})\n" + self.log_tail(name)
        )

    def check_alive(self, names: Sequence[str]) -> None:
        """Fail loudly if a process died mid-run (its figures would be errors, not speed)."""
        for name in names:
            code = self.procs[name].poll()
            if code is not None:
                raise StartError(
                    f"{name} died during the run (exit code {code})\n" + self.log_tail(name)
                )


# wrk's done() hook prints the latency (µs) at every percentile the CDF plots are drawn from.
DONE_LUA = (
    "done = function(summary, latency, requests)\n"
    f"  for _, p in ipairs({{{', '.join(f'{p:g}' for p in CDF_PERCENTILES)}}}) do\n"
    '    io.write(string.format("CDF %g %d\\n", p, latency:percentile(p)))\n'
    "  end\n"
    "end\n"
)


def write_lua(path: Path, token: str | None) -> None:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [[{CALL_BODY}]]",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if token:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    path.write_text("\n".join(lines) + "\n" + DONE_LUA)


def write_session_lua(path: Path, token: str | None, sessions: Sequence[str]) -> None:
    """Calls in sessions: wrk's request() hands each call the next of `sessions` in turn."""
    ids = ", ".join(f'"{sid}"' for sid in sessions)
    auth = f'["Authorization"] = "Bearer {token}", ' if token else ""
    path.write_text(
        f"local sessions = {{{ids}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #sessions + 1\n"
        f'  return wrk.format("POST", nil, {{{auth}["Content-Type"] = "application/json", '
        f'["X-Kubeforge-Session"] = sessions[i]}}, [[{CALL_BODY}]])\n'
        "end\n" + DONE_LUA
    )


def start_sessions(url: str, n: int, headers: dict[str, str]) -> list[str]:
    ids = []
    for _ in range(n):
        req = urllib.request.Request(url + "/v1/sessions", data=b"", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            ids.append(json.loads(resp.read())["session_id"])
    return ids


def register_session(replica_url: str, sid: str, headers: dict[str, str]) -> None:
    req = urllib.request.Request(f"{replica_url}/v1/sessions/{sid}", data=b"", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def wrk_argv(url: str, conns: int, threads: int, duration: int, script: Path) -> list[str]:
    return [
        *WRK_PREFIX,
        "wrk",
        f"-t{max(1, min(threads, conns))}",
        f"-c{conns}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(script),
        url + CALL_PATH,
    ]


def run_wrk_many(
    urls: Sequence[str], conns: Sequence[int], threads: int, duration: int, script: Path
) -> list[WrkResult]:
    """Run one wrk per URL concurrently and parse each."""
    procs = [
        subprocess.Popen(
            wrk_argv(u, c, threads, duration, script),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # own group for cleanup, same session: one scheduler autogroup
        )
        for u, c in zip(urls, conns, strict=True)
    ]
    outs: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=duration + 30)
            outs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [parse_wrk(o) for o in outs]


def split_connections(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [max(1, base + (1 if i < extra else 0)) for i in range(parts)]


_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks used so far by `pid` and its living descendants."""
    stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, utime, stime)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]), int(fields[12]))
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, (pp, _, _) in stats.items() if pp in frontier} - tree
        tree |= frontier
    return (
        sum(stats[p][1] for p in tree if p in stats),
        sum(stats[p][2] for p in tree if p in stats),
    )


def measure(
    urls: Sequence[str],
    total_conns: int,
    threads: int,
    duration: int,
    script: Path,
    proxy_pid: int | None = None,
) -> WrkResult:
    """Warm up, then measure. Several URLs: connections split, req/s summed, worst p50/p99.

    With `proxy_pid`, also the proxy's CPU per request (its process tree, from /proc): the
    figure that says where a proxy's cost is, whatever the scheduler did with the two cores.
    """
    conns = split_connections(total_conns, len(urls))
    run_wrk_many(urls, conns, threads, WARMUP_S, script)
    before = tree_cpu_ticks(proxy_pid) if proxy_pid else (0, 0)
    results = run_wrk_many(urls, conns, threads, duration, script)
    after = tree_cpu_ticks(proxy_pid) if proxy_pid else (0, 0)
    n = max(1, sum(r.requests for r in results))
    cpu = [(a - b) * _TICK_US / n for a, b in zip(after, before, strict=True)]
    return WrkResult(
        rps=sum(r.rps for r in results),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        non2xx=sum(r.non2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        proxy_user_us=cpu[0] if proxy_pid else None,
        proxy_sys_us=cpu[1] if proxy_pid else None,
        # several wrks (direct): the worst of them at each percentile, as for p50 and p99
        cdf_ms=[max(col) for col in zip(*(r.cdf_ms for r in results), strict=True)]
        if all(r.cdf_ms for r in results)
        else [],
    )


def start_tls(
    procs: Procs,
    tmp: Path,
    args: argparse.Namespace,
    start: Any,
    nginx_bin: str | None,
    other_core: list[str],
    auth: dict[str, str],
) -> list[tuple[str, list[str]]]:
    """Three replicas that serve TLS, and the router and nginx in front of them."""
    pki, name = tmp / "pki", tls.server_name("bench", "local")
    pki.mkdir()
    for key, data in tls.issue("bench", "local", datetime.datetime.now(datetime.UTC)).items():
        (pki / key).write_bytes(data)
    trust = ssl.create_default_context(cafile=str(pki / tls.KEY_CA))
    trust.check_hostname = False  # readiness by address; the proxies check the name
    urls = []
    for i in range(N_REPLICAS):
        port = free_port()
        argv = [sys.executable, "-m", "kubeforge.replica", "--actor", args.actor]
        argv += ["--port", str(port), "--host", "127.0.0.1"]
        procs.start(f"tls-replica{i}", [*other_core, *argv], {tls.ENV_DIR: str(pki)})
        urls.append(f"127.0.0.1:{port}")
    for i, url in enumerate(urls):
        procs.wait_ready(
            f"tls-replica{i}", f"https://{url}/readyz", args.startup_timeout, auth, trust
        )
    out = []
    port = free_port()
    argv = [sys.executable, "-m", "kubeforge.router", "--port", str(port), "--host", "127.0.0.1"]
    argv += [a for u in urls for a in ("--replica", f"http://{u}")]
    argv += ["--tls-server-name", name]
    procs.env[tls.ENV_DIR] = str(pki)  # the router reads the CA from there (start() has no env)
    try:
        url = start("kf-router+tls", [*argv, str(port)], "/readyz")
    finally:
        del procs.env[tls.ENV_DIR]
    if url:
        out.append(("kf-router+tls", [url]))
    if nginx_bin is not None:
        port = free_port()
        prefix = tmp / "nginx-tls"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            nginx_conf(
                prefix, urls, port, proxy_tls=NGINX_TLS.format(ca=pki / tls.KEY_CA, name=name)
            ).replace("proxy_pass http://", "proxy_pass https://")
        )
        argv_n = [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        url = start("nginx+tls", [*argv_n, str(port)], "/readyz")
        if url:
            out.append(("nginx+tls", [url]))
    return out


def vllm_router_available() -> bool:
    return (
        importlib.util.find_spec("vllm_router") is not None
        and importlib.util.find_spec("vllm_router_rs") is not None
    )


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--connections", default="16,64", help="comma-separated connection counts")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (order rotates)")
    p.add_argument("--quick", action="store_true", help="3 s measurements, one round")
    p.add_argument("--threads", type=int, default=1, choices=(1, 2), help="wrk threads")
    p.add_argument("--token", default=None, help="the token (default: a random one)")
    p.add_argument("--no-token", action="store_true", help="auth off (not how users run it)")
    p.add_argument(
        "--tls", action="store_true", help="also the router and nginx over replicas serving TLS"
    )
    p.add_argument(
        "--pin", action="store_true", help="proxy on core 0, replicas and wrk on core 1 (taskset)"
    )
    p.add_argument("--actor", default="examples.echo:Echo", help="replica actor spec")
    p.add_argument("--startup-timeout", type=float, default=60.0, help="seconds per process")
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3, 1
    args.conn_list = [int(c) for c in str(args.connections).split(",") if c.strip()]
    if not args.conn_list or min(args.conn_list) < 1 or args.rounds < 1:
        p.error("--connections needs positive integers, --rounds at least 1")
    if args.no_token:
        args.token = None
    elif args.token is None:
        args.token = secrets.token_hex(16)
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=:-]+", args.token):
        p.error("--token: use letters, digits and ._~+/=:- only")
    if args.pin and (shutil.which("taskset") is None or (os.cpu_count() or 1) < 2):
        p.error("--pin needs taskset and two cores")
    return args


HAPROXY_CONF = """\
global
    maxconn 8192
    nbthread 1
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend calls
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
{servers}
"""


def versions() -> dict[str, str | None]:
    """What was measured: the peers' versions as they report them (pinned by the packages)."""

    def first_line(argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else None

    try:
        vllm = importlib.metadata.version("vllm-router")
    except importlib.metadata.PackageNotFoundError:
        vllm = None
    return {
        "wrk": first_line(["wrk", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "vllm-router": vllm,
        "kubeforge": importlib.metadata.version("kubeforge"),
        "python": sys.version.split()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found on PATH (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    nginx_bin = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    haproxy_bin = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBEFORGE_TOKEN"}
    if args.token:
        env["KUBEFORGE_TOKEN"] = args.token
    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    py = sys.executable
    proxy_core = ["taskset", "-c", "0"] if args.pin else []
    other_core = ["taskset", "-c", "1"] if args.pin else []
    WRK_PREFIX[:] = other_core
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    samples: dict[str, dict[int, list[WrkResult]]] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kf-router-bench-") as tmp_s:
        tmp = Path(tmp_s)
        script = tmp / "req.lua"
        write_lua(script, args.token)
        procs = Procs(tmp, env)
        try:
            replica_urls: list[str] = []
            replica_names = [f"replica{i}" for i in range(N_REPLICAS)]
            for name in replica_names:
                port = free_port()
                argv_r = [py, "-m", "kubeforge.replica", "--actor", args.actor]
                argv_r += ["--port", str(port), "--host", "127.0.0.1"]
                procs.start(name, [*other_core, *argv_r])
                replica_urls.append(f"http://127.0.0.1:{port}")
            for name, url in zip(replica_names, replica_urls, strict=True):
                procs.wait_ready(name, url + "/readyz", args.startup_timeout, auth)
            print(f"replicas ready: {' '.join(replica_urls)}", flush=True)
            # (name, URLs, pid whose CPU counts, wrk script); every proxy runs for the whole
            # run, so that rounds can interleave them.
            targets: list[tuple[str, list[str], int | None, Path]] = [
                ("direct", replica_urls, None, script)
            ]

            def start(name: str, argv: list[str], ready: str) -> str | None:
                port_of = argv[-1]
                url = f"http://127.0.0.1:{port_of}"
                try:
                    procs.start(name, [*proxy_core, *argv[:-1]])
                    procs.wait_ready(name, url + ready, args.startup_timeout, auth)
                    return url
                except StartError as e:
                    procs.check_alive(replica_names)
                    failed[name] = str(e)
                    print(f"{name}: FAILED: {e}", flush=True)
                    return None

            servers = [u.removeprefix("http://") for u in replica_urls]
            sessions: list[str] = []
            for name, balance in (("nginx", "least_conn;"), ("nginx/s", HASH_ON_SESSION)):
                if nginx_bin is None:
                    skipped[name] = "nginx not installed (Debian: apt-get install nginx-light)"
                    continue
                port = free_port()
                prefix = tmp / name.replace("/", "-")
                prefix.mkdir()
                conf = prefix / "nginx.conf"
                conf.write_text(nginx_conf(prefix, servers, port).replace("least_conn;", balance))
                argv_n = [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
                url = start(name, [*argv_n, str(port)], "/readyz")
                if url:
                    targets.append((name, [url], procs.procs[name].pid, script))
            if haproxy_bin is None:
                skipped["haproxy"] = "haproxy not installed (Debian: apt-get install haproxy)"
            else:
                port = free_port()
                conf = tmp / "haproxy.cfg"
                conf.write_text(
                    HAPROXY_CONF.format(
                        port=port,
                        servers="\n".join(f"    server r{i} {s}" for i, s in enumerate(servers)),
                    )
                )
                url = start("haproxy", [haproxy_bin, "-db", "-f", str(conf), str(port)], "/readyz")
                if url:
                    targets.append(("haproxy", [url], procs.procs["haproxy"].pid, script))
            port = free_port()
            kf_argv = [py, "-m", "kubeforge.router", "--port", str(port), "--host", "127.0.0.1"]
            for u in replica_urls:
                kf_argv += ["--replica", u]
            url = start("kf-router", [*kf_argv, str(port)], "/readyz")
            if url:
                pid = procs.procs["kf-router"].pid
                targets.append(("kf-router", [url], pid, script))
                sessions = start_sessions(url, SESSIONS, auth)
                lua = tmp / "session.lua"
                write_session_lua(lua, args.token, sessions)
                targets.append(("kf-router/s", [url], pid, lua))
                for name, urls, pid_n, _ in list(targets):
                    if name == "nginx/s":  # the same session header, hashed by nginx
                        targets.remove((name, urls, pid_n, script))
                        targets.append((name, urls, pid_n, lua))
                        # nginx cannot open a session on the replica it hashes to: every
                        # replica learns the ids, so each call checks one as through the router.
                        for replica_url in replica_urls:
                            for sid in sessions:
                                register_session(replica_url, sid, auth)
            if args.tls:
                tls_targets = start_tls(procs, tmp, args, start, nginx_bin, other_core, auth)
                targets += [(n, u, procs.procs[n].pid, script) for n, u in tls_targets]
            if not vllm_router_available():
                skipped["vllm-router"] = "vllm-router not installed (pip install vllm-router)"
            else:
                port = free_port()
                api_key = ["--api-key", args.token] if args.token else []
                argv_v = [py, "-m", "vllm_router.launch_router", "--worker-urls", *replica_urls]
                argv_v += ["--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
                argv_v += ["--worker-startup-check-interval", "1"]
                argv_v += ["--prometheus-port", str(free_port()), "--log-level", "warning"]
                url = start("vllm-router", [*argv_v, *api_key, str(port)], "/health")
                if url:
                    targets.append(("vllm-router", [url], procs.procs["vllm-router"].pid, script))

            for rnd in range(args.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                print(f"round {rnd + 1}/{args.rounds}: {' '.join(t[0] for t in order)}")
                for c in args.conn_list:
                    for name, urls, pid, lua in order:
                        r = measure(urls, c, args.threads, args.duration, lua, pid)
                        procs.check_alive(replica_names)
                        samples.setdefault(name, {}).setdefault(c, []).append(r)
                        print(
                            f"  {name:<12} c={c:<4} {r.rps:>10.0f} req/s  p50 {r.p50_ms:.2f} ms"
                            f"  errors {r.errors}",
                            flush=True,
                        )
        except StartError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()

    report(args, samples, skipped, failed, versions())
    # vllm-router is only a point of comparison: its failure alone doesn't fail the run.
    return 1 if set(failed) - {"vllm-router"} else 0


@dataclass
class Point:
    """One target at one connection count over the rounds: medians, and the spread of req/s."""

    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # the proxy's CPU per call (user + system), median
    errors: int
    cdf_ms: list[float]  # latency at figures.CDF_PERCENTILES, the median over the rounds

    @property
    def valid(self) -> bool:
        return self.errors == 0

    @classmethod
    def of(cls, runs: list[WrkResult]) -> Point:
        def median(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        cpu = [
            r.proxy_user_us + r.proxy_sys_us
            for r in runs
            if r.proxy_user_us is not None and r.proxy_sys_us is not None
        ]
        return cls(
            rps=median([r.rps for r in runs]),
            rps_min=min(r.rps for r in runs),
            rps_max=max(r.rps for r in runs),
            p50_ms=median([r.p50_ms for r in runs]),
            p99_ms=median([r.p99_ms for r in runs]),
            cpu_us=median(cpu) if cpu else None,
            errors=sum(r.errors for r in runs),
            cdf_ms=median_curve([r.cdf_ms for r in runs]),
        )


def ratio_of(a: Point | None, b: Point | None) -> float | None:
    """a/b in req/s; None when either is missing or had errors (an invalid point)."""
    if a is None or b is None or not a.valid or not b.valid or not b.rps:
        return None
    return a.rps / b.rps


def report(
    args: argparse.Namespace,
    samples: dict[str, dict[int, list[WrkResult]]],
    skipped: dict[str, str],
    failed: dict[str, str],
    seen_versions: dict[str, str | None],
) -> None:
    points = {t: {c: Point.of(runs) for c, runs in per.items()} for t, per in samples.items()}
    print()
    print(
        f"POST {CALL_PATH}, {N_REPLICAS} echo replicas, wrk {args.threads} thread(s), "
        f"{args.rounds} interleaved round(s) of {args.duration}s (+{WARMUP_S}s warm-up), "
        f"auth {'on' if args.token else 'OFF'}, health polling on"
        + (", proxy pinned to core 0" if args.pin else "")
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in seen_versions.items() if v))
    print("vllm-router is measured through its transparent-proxy fallback (it parses and")
    print("re-serialises the JSON): a different path from the others, shown for reference only.")
    header = (
        f"{'target':<12} {'conns':>5} {'req/s median':>12} {'[min - max]':>17} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'cpu us/call':>11} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for target, per in points.items():
        for c, pt in per.items():
            cpu = fmt(pt.cpu_us, ".1f")
            flag = "  <-- INVALID (errors)" if not pt.valid else ""
            spread = f"[{pt.rps_min:.0f} - {pt.rps_max:.0f}]"
            print(
                f"{target:<12} {c:>5} {pt.rps:>12.0f} {spread:>17}"
                f" {pt.p50_ms:>7.2f} {pt.p99_ms:>7.2f} {cpu:>11} {pt.errors:>6}{flag}"
            )
    for target, why in {**skipped, **failed}.items():
        print(f"{target:<12} {why.splitlines()[0]}")

    def get(target: str, c: int) -> Point | None:
        return points.get(target, {}).get(c)

    ratios: dict[str, dict[str, float | None]] = {}
    print()
    for c in args.conn_list:
        router, direct = get("kf-router", c), get("direct", c)
        ratios[str(c)] = {
            "router_over_nginx_rps": ratio_of(router, get("nginx", c)),
            "router_over_haproxy_rps": ratio_of(router, get("haproxy", c)),
            "router_over_direct_rps": ratio_of(router, direct),
            "router_in_sessions_over_nginx_hash_rps": ratio_of(
                get("kf-router/s", c), get("nginx/s", c)
            ),
            "vllm_router_fallback_over_nginx_rps": ratio_of(get("vllm-router", c), get("nginx", c)),
            "router_added_p50_ms": (router.p50_ms - direct.p50_ms if router and direct else None),
            "router_tls_over_nginx_tls_rps": ratio_of(get("kf-router+tls", c), get("nginx+tls", c)),
            "router_tls_over_router_rps": ratio_of(get("kf-router+tls", c), router),
        }
        r = ratios[str(c)]
        print(
            f"c={c:<4} router/nginx {fmt(r['router_over_nginx_rps'], '.2f')}  "
            f"router/haproxy {fmt(r['router_over_haproxy_rps'], '.2f')}  "
            f"router/direct {fmt(r['router_over_direct_rps'], '.2f')}  "
            "sessions: router/nginx-hash "
            f"{fmt(r['router_in_sessions_over_nginx_hash_rps'], '.2f')}  "
            f"added p50 {fmt(r['router_added_p50_ms'], '+.2f')} ms"
        )
        if args.tls:
            plain, secure = router, get("kf-router+tls", c)
            cpu = (
                secure.cpu_us / plain.cpu_us
                if plain and secure and plain.cpu_us and secure.cpu_us
                else None
            )
            print(
                f"       TLS: router+tls/router {fmt(r['router_tls_over_router_rps'], '.2f')}  "
                f"router+tls/nginx+tls {fmt(r['router_tls_over_nginx_tls_rps'], '.2f')}  "
                f"router CPU per call with TLS {fmt(cpu, '.2f')}x"
            )
    print("(n/a: a peer is missing, or a point had errors and does not count)")
    out: dict[str, Any] = {
        "request": f"POST {CALL_PATH}",
        "replicas": N_REPLICAS,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "wrk_threads": args.threads,
        "auth": bool(args.token),
        "pinned": args.pin,
        "tls": args.tls,
        "connections": args.conn_list,
        "versions": seen_versions,
        "targets": {
            t: {str(c): {**asdict(pt), "valid": pt.valid} for c, pt in per.items()}
            for t, per in points.items()
        },
        "ratios": ratios,
        "skipped": skipped,
        "failed": {t: why.splitlines()[0] for t, why in failed.items()},
    }
    out["cdf_percentiles"] = list(CDF_PERCENTILES)
    emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
