"""Security on a shared cluster: the token rotates under load with no call refused."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

import aiohttp
import pytest

from kubeforge import ServiceClient
from kubeforge.errors import UnauthorizedError
from tests.e2e.conftest import ExternalCluster, Operator
from tests.e2e.test_cluster import wait_for
from tests.e2e.test_operator import _eq, _router_pods, _states, _token, _until, fsvc, service

pytestmark = pytest.mark.timeout(600)


class Load:
    """Callers that never stop during a rotation: calls, session calls and broadcasts through
    every router pod. Like a real client, they take the Secret's token whenever it changes."""

    def __init__(self, urls: list[str], token: str, session: str) -> None:
        self.urls, self.token, self.session = urls, token, session
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = False
        self.by_token: dict[str, int] = {}

    async def worker(self, n: int) -> None:
        url = self.urls[n % len(self.urls)]
        while not self.stopping:
            token = self.token
            async with ServiceClient(url, token=token, timeout=30) as client:
                while not self.stopping and token == self.token:
                    try:
                        if n % 3 == 0:
                            await client.call_all("value")
                        elif n % 3 == 1:
                            await client.whoami.route(sess_id=self.session)
                        else:
                            await client.incr.route(1)
                        self.ok += 1
                        self.by_token[token] = self.by_token.get(token, 0) + 1
                    except Exception as exc:  # every failure counts, whatever it is
                        self.failures.append(f"{time.monotonic():.2f} {type(exc).__name__}: {exc}")


async def test_a_token_rotation_refuses_no_call_under_load(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    spec = service("rot", 2, gpus=0, router={"replicas": 2})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
    wait_for(lambda: len(_router_pods(cluster, namespace, "rot")) == 2, 120)
    ready = lambda: fsvc(cluster, namespace, "rot").get("status", {}).get("readyReplicas") == 2  # noqa: E731
    wait_for(ready, 90)
    urls = [f"http://{p['status']['podIP']}:8080" for p in _router_pods(cluster, namespace, "rot")]
    old = _token(cluster, namespace, "rot")
    for url in urls:
        async with ServiceClient(url, token=old) as c:
            await _until(lambda c=c: _eq(_states(c), ["HEALTHY"] * 2), 60, "router ready")
    async with ServiceClient(urls[0], token=old) as c:
        session = await c.start_session()

    load = Load(urls, old, session)
    workers = [asyncio.create_task(load.worker(n)) for n in range(6)]

    async def follow_secret() -> None:
        while not load.stopping:
            token = await asyncio.to_thread(_token, cluster, namespace, "rot")
            load.token = token
            await asyncio.sleep(0.5)

    follower = asyncio.create_task(follow_secret())
    try:
        await asyncio.sleep(3)
        before = load.ok
        started = time.monotonic()
        rotate = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kubeforge.cli",
            "rotate-token",
            "fsvc/rot",
            "-n",
            namespace,
            "--grace",
            "5",
            "--timeout",
            "240",
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await rotate.communicate()
        took = time.monotonic() - started
        during = load.ok - before
        await asyncio.sleep(3)
    finally:
        load.stopping = True
        await asyncio.gather(*workers, follower)
    text = out.decode()
    assert rotate.returncode == 0, text
    assert "step 3/3" in text and "token rotated" in text, text
    new = _token(cluster, namespace, "rot")
    print(
        f"rotation: {took:.1f}s, {during} calls during it, {len(load.failures)} failed; "
        f"calls by token: {sorted(load.by_token.values())}\n{text}"
    )
    assert new != old
    assert load.failures == [], load.failures[:5]
    assert during > 100 and load.by_token.get(new, 0) > 0 and load.by_token.get(old, 0) > 0
    # The old token is refused now; the new one works, and the session from before survives.
    async with ServiceClient(urls[1], token=old) as c:
        with pytest.raises(UnauthorizedError):
            await c.value.route()
    async with ServiceClient(urls[1], token=new) as c:
        assert (await c.whoami.route(sess_id=session))["replica"]


def _policies(cluster: Any, namespace: str) -> list[str]:
    out = cluster.kubectl("get", "networkpolicy", "-n", namespace, "-o", "name").stdout
    return sorted(line.split("/", 1)[1] for line in out.split())


def test_network_policies_are_on_by_default_and_go_when_the_spec_turns_them_off(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service("np", 1, gpus=0))
    wait_for(lambda: _policies(cluster, namespace) == ["np-replicas", "np-router"], 60)
    off = service("np", 1, gpus=0, networkPolicy={"enabled": False})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=off)
    wait_for(lambda: _policies(cluster, namespace) == [], 60)
    # Deleted by someone else while on: restored at once, as any child is.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service("np", 1, gpus=0))
    wait_for(lambda: _policies(cluster, namespace) == ["np-replicas", "np-router"], 60)
    cluster.kubectl("delete", "networkpolicy", "-n", namespace, "np-replicas")
    wait_for(lambda: _policies(cluster, namespace) == ["np-replicas", "np-router"], 60)
    # A changed spec changes the policy in place.
    trainers = {"podSelector": {"matchLabels": {"role": "trainer"}}}
    narrowed = service("np", 1, gpus=0, networkPolicy={"routerFrom": [trainers]})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=narrowed)

    def router_from() -> list[Any]:
        policy = cluster.kubectl("get", "networkpolicy", "-n", namespace, "np-router", "-o", "json")
        return list(json.loads(policy.stdout)["spec"]["ingress"][0].get("from") or [])

    wait_for(lambda: router_from() == [trainers], 60)


# Run in a pod: connect to host:port; print "open", or "closed" with why (a dropped SYN times out).
_CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "    print('open')\n"
    "except OSError as exc:\n"
    "    print('closed', exc)\n"
)


def _connect_from(cluster: Any, ns: str, pod: str, container: str, ip: str, port: int) -> str:
    out = cluster.kubectl(
        "exec", "-n", ns, pod, "-c", container, "--", "python", "-c", _CONNECT, ip, str(port)
    )
    return str(out.stdout.split()[0])


def _client_pod(image: str) -> str:
    """A plain pod of nobody's Service, admitted by Pod Security `restricted`."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client"},
            "spec": {
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "client",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", "import time; time.sleep(600)"],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
    )


@pytest.mark.real_node
async def test_only_the_services_routers_reach_its_replicas(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    image = os.environ.get("KUBEFORGE_E2E_REPLICA_IMAGE")
    if not image:
        pytest.fail("the kind lane sets KUBEFORGE_E2E_REPLICA_IMAGE")
    for name in ("np", "other"):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=service(name, 1, gpus=0))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_client_pod(image))
    for name in ("np", "other"):
        wait_for(lambda name=name: len(_router_pods(cluster, namespace, name)) == 1, 120)
        wait_for(
            lambda name=name: (
                fsvc(cluster, namespace, name).get("status", {}).get("readyReplicas") == 1
            ),
            120,
        )
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/client", "--timeout=90s")
    replica = json.loads(
        cluster.kubectl("get", "pod", "-n", namespace, "np-replica-0", "-o", "json").stdout
    )
    ip = replica["status"]["podIP"]
    router = _router_pods(cluster, namespace, "np")[0]["metadata"]["name"]
    seen = {
        "np's router": _connect_from(cluster, namespace, router, "router", ip, 8000),
        "other's replica": _connect_from(
            cluster, namespace, "other-replica-0", "replica", ip, 8000
        ),
        "a plain pod": _connect_from(cluster, namespace, "client", "client", ip, 8000),
    }
    assert seen == {"np's router": "open", "other's replica": "closed", "a plain pod": "closed"}
    # Calls keep working through the router, and its probes kept the replica Ready.
    url = f"http://{_router_pods(cluster, namespace, 'np')[0]['status']['podIP']}:8080"
    async with ServiceClient(url, token=_token(cluster, namespace, "np")) as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"]), 60, "router ready")
        assert [await c.incr.route(1) for _ in range(3)] == [1, 2, 3]
    # The refusal was the policy's: with it off, the plain pod connects.
    off = service("np", 1, gpus=0, networkPolicy={"enabled": False})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=off)
    wait_for(lambda: _policies(cluster, namespace) == ["other-replicas", "other-router"], 60)
    wait_for(lambda: _connect_from(cluster, namespace, "client", "client", ip, 8000) == "open", 30)


async def test_tls_between_router_and_replicas_with_the_services_own_ca(
    cluster: Any, namespace: str, operator: Operator
) -> None:
    """On by default (the spec says nothing); off when the spec says so."""
    from cryptography import x509

    from kubeforge import tls

    spec = service("sec", 2, gpus=0)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=spec)
    wait_for(lambda: len(_router_pods(cluster, namespace, "sec")) == 1, 120)
    ready = lambda: fsvc(cluster, namespace, "sec").get("status", {}).get("readyReplicas") == 2  # noqa: E731
    wait_for(ready, 120)  # the kubelet's probes speak HTTPS to them
    secret = json.loads(
        cluster.kubectl("get", "secret", "sec-tls", "-n", namespace, "-o", "json").stdout
    )
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [tls.server_name("sec", namespace)]
    router = _router_pods(cluster, namespace, "sec")[0]
    assert _replica_ports(cluster, namespace, "sec") == ["https", "https"]
    mounted = [v for v in router["spec"]["volumes"] if v["name"] == "kubeforge-tls"]
    assert mounted[0]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # no key
    url = f"http://{router['status']['podIP']}:8080"
    token = _token(cluster, namespace, "sec")
    async with ServiceClient(url, token=token) as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"] * 2), 60, "router reaches replicas")
        assert sorted([await c.incr.route(1) for _ in range(4)]) == [1, 1, 2, 2]
        assert sorted(await c.call_all("value")) == [2, 2]
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.get(url + "/v1/metrics") as resp,
    ):
        relay = (await resp.json())["relay"]
    assert relay["kind"] == "native" and relay["relayed"] >= 4, relay  # TLS in Rust
    # Plain HTTP to a replica gets no answer: the handshake fails first.
    replica = json.loads(
        cluster.kubectl("get", "pod", "-n", namespace, "sec-replica-0", "-o", "json").stdout
    )
    if isinstance(cluster, ExternalCluster):  # from inside the pod (its policy admits routers)
        plain = "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"
        done = cluster.kubectl(
            "exec",
            "-n",
            namespace,
            "sec-replica-0",
            "-c",
            "replica",
            "--",
            "python",
            "-c",
            plain,
            check=False,
        )
        assert done.returncode != 0, done
        assert "RemoteDisconnected" in done.stderr or "ConnectionReset" in done.stderr, done
    else:
        with pytest.raises(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://{replica['status']['podIP']}:8000/healthz") as resp,
            ):
                await resp.read()
    # Off by the spec's word: the replicas roll over to plain HTTP, and calls go on.
    plain_spec = service("sec", 2, gpus=0, tls={"enabled": False})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=plain_spec)
    wait_for(lambda: _replica_ports(cluster, namespace, "sec") == ["http", "http"], 180)
    wait_for(ready, 120)

    def plain_router() -> bool:  # the router rolled over too: it has no CA to trust now
        pods = _router_pods(cluster, namespace, "sec")
        volumes = {v["name"] for p in pods for v in p["spec"]["volumes"]}
        return len(pods) == 1 and "kubeforge-tls" not in volumes and "podIP" in pods[0]["status"]

    wait_for(plain_router, 120)
    router = _router_pods(cluster, namespace, "sec")[0]
    url = f"http://{router['status']['podIP']}:8080"
    async with ServiceClient(url, token=token) as c:
        await _until(lambda: _eq(_states(c), ["HEALTHY"] * 2), 60, "plain replicas")
        assert sorted(await c.call_all("value")) == [0, 0]


def _replica_ports(cluster: Any, namespace: str, name: str) -> list[str]:
    """The names of the Service's running replica pods' ports: what they speak."""
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"kubeforge.dev/service={name}", "-o", "json"
        ).stdout
    )["items"]
    return sorted(
        c["ports"][0]["name"]
        for p in pods
        if p["metadata"]["labels"].get("kubeforge.dev/component") == "replica"
        and not p["metadata"].get("deletionTimestamp")
        for c in p["spec"]["containers"]
        if c["name"] == "replica"
    )
