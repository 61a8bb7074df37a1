"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

Started the way controller-runtime's envtest starts an API server (TLS with throwaway
certificates, RBAC on, service-account signing keys), plus the controller manager and the
scheduler envtest leaves out, so Deployments make pods, pods get scheduled, and owners'
deletion cascades. Everything lives in one temp dir and goes away with `stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from devcluster.pki import Pair, Pki
from kubeforge.local import free_port

REPO = Path(__file__).resolve().parents[1]
SERVICE_CIDR = "10.96.0.0/24"


class ClusterError(RuntimeError):
    """The control plane could not start; the message carries the failing component's log."""


def bin_dir() -> Path:
    """Where `make k8s-bin` put the binaries ($KUBEFORGE_K8S_BIN overrides)."""
    override = os.environ.get("KUBEFORGE_K8S_BIN")
    if override:
        return Path(override)
    out = subprocess.run(
        [str(REPO / "k8s" / "build-bin.sh"), "--print-dir"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    user: str,
    client: Pair | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    creds: dict[str, str] = {}
    if client is not None:
        creds = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        creds = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "e2e",
        "clusters": [
            {"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [
            {"name": "e2e", "context": {"cluster": "e2e", "user": user, "namespace": namespace}}
        ],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class ControlPlane:
    def __init__(self, root: Path | None = None, bins: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="kubeforge-e2e-"))
        self.owns_root = root is None
        self.bins = bins or bin_dir()
        missing = [
            b
            for b in (
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
            )
            if not (self.bins / b).exists()
        ]
        if missing:
            raise ClusterError(f"missing {', '.join(missing)} in {self.bins}: run `make k8s-bin`")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._argv: dict[str, list[str]] = {}
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.pki = Pki(self.root / "pki")
        self.admin = self.pki.issue("admin", "kubeforge-e2e-admin", "system:masters")
        self.kubeconfig = self.root / "admin.kubeconfig"
        # Every request a service account makes (operators, routers), one JSON line each: what
        # the e2e tier's RBAC audit compares with what the accounts are granted.
        self.audit_log = self.root / "audit.log"

    def _audit_policy(self) -> Path:
        """Metadata (who, verb, resource, answer) of service accounts' requests; nothing else."""
        path = self.root / "audit-policy.yaml"
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"},
            ],
        }
        path.write_text(yaml.safe_dump(policy))
        return path

    # processes ----------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> None:
        self._argv[name] = argv
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [str(self.bins / name), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        log.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def _wait(
        self, name: str, ok: Callable[[], bool], timeout: float, progress: Callable[[str], None]
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not healthy after {timeout:g}s:\n{self.log_tail(name)}")
            time.sleep(0.1)
        progress(f"{name} ready")

    def _https_ok(self, url: str, client: bool = True) -> bool:
        ctx = (
            ssl.create_default_context(cafile=str(self.pki.ca))
            if client
            else ssl._create_unverified_context()
        )
        if client:
            ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    # lifecycle ----------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] = print, timeout: float = 90.0) -> None:
        try:
            self._start_all(progress, timeout)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, progress: Callable[[str], None], timeout: float) -> None:
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._start(
            "etcd",
            [
                "--name",
                "e2e",
                "--data-dir",
                str(self.root / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"e2e=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._wait("etcd", lambda: _http_ok(etcd_url + "/health"), timeout, progress)

        serving = self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            hosts=(
                "127.0.0.1",
                "localhost",
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        )
        sa = self.pki.service_account_keys()
        self._start(
            "kube-apiserver",
            [
                "--etcd-servers",
                etcd_url,
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(self.api_port),
                "--tls-cert-file",
                str(serving.cert),
                "--tls-private-key-file",
                str(serving.key),
                "--client-ca-file",
                str(self.pki.ca),
                "--authorization-mode",
                "Node,RBAC",
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--allow-privileged=true",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(sa.cert),
                "--service-account-signing-key-file",
                str(sa.key),
                "--cert-dir",
                str(self.root / "apiserver-certs"),
                "--enable-priority-and-fairness=false",
                "--endpoint-reconciler-type",
                "none",
                "--audit-policy-file",
                str(self._audit_policy()),
                "--audit-log-path",
                str(self.audit_log),
                "--audit-log-format",
                "json",
            ],
        )
        self._wait(
            "kube-apiserver", lambda: self._https_ok(self.server + "/readyz"), timeout, progress
        )
        write_kubeconfig(self.kubeconfig, self.server, self.pki.ca, "admin", self.admin)

        cm_port, sched_port = free_port(), free_port()
        self._start(
            "kube-controller-manager",
            [
                "--kubeconfig",
                str(self.kubeconfig),
                "--leader-elect=false",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(cm_port),
                "--service-account-private-key-file",
                str(sa.key),
                "--root-ca-file",
                str(self.pki.ca),
                "--cluster-signing-cert-file",
                str(self.pki.ca),
                "--cluster-signing-key-file",
                str(self.pki.ca_key),
                "--use-service-account-credentials=true",
                "--controllers",
                "*,-nodeipam,-cloud-node-lifecycle,-service,-route",
                "--node-monitor-grace-period",
                "40s",
            ],
        )
        self._start(
            "kube-scheduler",
            [
                "--kubeconfig",
                str(self.kubeconfig),
                "--leader-elect=false",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(sched_port),
            ],
        )
        self._wait(
            "kube-controller-manager",
            lambda: self._https_ok(f"https://127.0.0.1:{cm_port}/healthz", client=False),
            timeout,
            progress,
        )
        self._wait(
            "kube-scheduler",
            lambda: self._https_ok(f"https://127.0.0.1:{sched_port}/healthz", client=False),
            timeout,
            progress,
        )
        # The controller manager is really working once it has made the default account.
        self._wait(
            "kube-controller-manager",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            timeout,
            lambda _m: None,
        )

    def restart(self, name: str, down: float = 0.0, timeout: float = 90.0) -> float:
        """Stop one component (SIGTERM, as a rolling restart would), keep it down for `down`
        seconds, start it again with the same flags and data, and wait until the API answers.
        Returns the seconds the API was unavailable from the stop (fault tests report it)."""
        proc = self.procs[name]
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(down)
        self._start(name, self._argv[name])
        self._wait(name, lambda: self._https_ok(self.server + "/readyz"), timeout, lambda _m: None)
        return time.monotonic() - stopped

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_kubectl(self.bins / "kubectl", self.kubeconfig, *args, check=check, input=input)

    def stop(self, grace: float = 10.0) -> None:
        """Stop in reverse order, SIGKILL what outlives `grace`, remove the temp dir."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def run_kubectl(
    kubectl: Path | str,
    kubeconfig: Path,
    *args: str,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """kubectl with captured text output, for the harness and for tests."""
    return subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        check=check,
        input=input,
        timeout=timeout,
    )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False
