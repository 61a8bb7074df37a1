"""cert-manager issues and renews a Service's TLS when its spec names an issuer: a real
cert-manager controller (built from its Go module by `make k8s-bin`) against the e2e cluster's
API server, its CRDs from the same module."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from kubeforge import ServiceClient, tls
from tests.e2e.conftest import Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import _eq, _router_pods, _states, _token, _until, fsvc, service
from tests.steady_calls import SteadyCalls

pytestmark = [pytest.mark.process_node, pytest.mark.timeout(600)]

# The usual setup: a self-signed root, and an issuer that signs with it (it keeps its CA
# across renewals, which routers rely on).
ISSUERS = [
    {"kind": "Issuer", "metadata": {"name": "selfsigned"}, "spec": {"selfSigned": {}}},
    {
        "kind": "Certificate",
        "metadata": {"name": "root-ca"},
        "spec": {
            "isCA": True,
            "commonName": "kubeforge e2e root",
            "secretName": "root-ca",
            "privateKey": {"algorithm": "ECDSA", "size": 256},
            "issuerRef": {"name": "selfsigned"},
        },
    },
    {"kind": "Issuer", "metadata": {"name": "ca"}, "spec": {"ca": {"secretName": "root-ca"}}},
]


@pytest.fixture(scope="module")
def cert_manager(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bins = cluster.control.bins
    binary, crds = bins / "cert-manager-controller", bins / "cert-manager-crds"
    if not binary.exists() or not crds.is_dir():
        pytest.fail(f"no cert-manager in {bins}: `make k8s-bin` builds it")
    docs = []
    for path in sorted(crds.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        doc["metadata"].pop("labels", None)  # Helm templates in the module's copy
        docs.append(doc)
    cluster.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": docs}),
    )
    for doc in docs:
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{doc['metadata']['name']}", "--timeout=60s"
        )
    log = tmp_path_factory.mktemp("cert-manager") / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--kubeconfig={cluster.control.kubeconfig}",
                "--leader-elect=false",
                "--metrics-listen-address=127.0.0.1:0",
                "--v=2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _secret(cluster: Any, namespace: str, name: str) -> dict[str, bytes]:
    """The Secret's data; empty while it does not exist (cert-manager has not issued yet)."""
    got = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    if got.returncode != 0:
        assert "NotFound" in got.stderr, got.stderr
        return {}
    data = json.loads(got.stdout).get("data") or {}
    return {k: base64.b64decode(v) for k, v in data.items()}


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _presented(ip: str) -> int:
    """The serial of the certificate a replica shows a new connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only reading it
    with (
        socket.create_connection((ip, 8000), timeout=5) as raw,
        ctx.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_cert_manager_issues_and_renews_the_replicas_certificate_with_no_call_failing(
    cluster: Any, namespace: str, operator: Operator, cert_manager: Path
) -> None:
    for doc in ISSUERS:
        manifest = {"apiVersion": "cert-manager.io/v1", **doc}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    wait_for(lambda: _secret(cluster, namespace, "root-ca").get("tls.crt"), 60)
    root = x509.load_pem_x509_certificate(_secret(cluster, namespace, "root-ca")["tls.crt"])

    spec = service("cm", 2, gpus=0, tls={"issuerRef": {"name": "ca"}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
    ready = lambda: fsvc(cluster, namespace, "cm").get("status", {}).get("readyReplicas") == 2  # noqa: E731
    wait_for(ready, 180)
    certificate = json.loads(
        cluster.kubectl("get", "certificate", "cm-tls", "-n", namespace, "-o", "json").stdout
    )
    assert certificate["metadata"]["ownerReferences"][0]["kind"] == "Service"
    issued = _secret(cluster, namespace, "cm-tls")
    assert issued["ca.crt"] == _secret(cluster, namespace, "root-ca")["tls.crt"]
    cert = x509.load_pem_x509_certificate(issued["tls.crt"])
    cert.verify_directly_issued_by(root)  # cert-manager's, from the CA issuer
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [tls.server_name("cm", namespace)]
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "kubeforge.dev/component=replica", "-o", "json"
        ).stdout
    )["items"]
    ips = [
        p["status"]["podIP"]
        for p in pods
        if p["metadata"]["labels"]["kubeforge.dev/service"] == "cm"
    ]
    assert [_presented(ip) for ip in ips] == [cert.serial_number] * 2

    wait_for(lambda: len(_router_pods(cluster, namespace, "cm")) == 1, 120)
    router = _router_pods(cluster, namespace, "cm")[0]
    url = f"http://{router['status']['podIP']}:8080"
    token = _token(cluster, namespace, "cm")
    async with ServiceClient(url, token=token) as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"] * 2), 60, "router reaches replicas")
    load = SteadyCalls(url, token)
    try:
        await asyncio.sleep(1)
        # A renewal now, as `cmctl renew` asks for one: the Issuing condition on the status.
        conditions = [
            *certificate["status"].get("conditions", []),
            {
                "type": "Issuing",
                "status": "True",
                "reason": "ManuallyTriggered",
                "message": "renewal asked by the e2e test",
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        ]
        cluster.kubectl(
            "patch",
            "certificate",
            "cm-tls",
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"conditions": conditions}}),
        )
        deadline = time.monotonic() + 90  # polled without blocking the callers meanwhile
        while (
            renewed := _serial(
                (await asyncio.to_thread(_secret, cluster, namespace, "cm-tls"))["tls.crt"]
            )
        ) == cert.serial_number:
            assert time.monotonic() < deadline, "cert-manager did not renew"
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 90  # the node's secret watch, then the replica's reload
        while (seen := [await asyncio.to_thread(_presented, ip) for ip in ips]) != [renewed] * 2:
            assert set(seen) <= {cert.serial_number, renewed}, seen
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # calls on connections made after the renewal, too
    finally:
        await load.stop()
    assert load.failed == [] and load.calls > 100, (load.calls, load.failed[:3])
    print(f"cert-manager renewal: {load.calls} calls meanwhile, {len(load.failed)} failed")
