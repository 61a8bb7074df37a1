"""The images as users run them (`make images`): non-root, read-only root, the commands the
operator writes, no build secret left in any layer, and calls served by a router and replicas
running from the images. Containers and networks made here are removed; nothing is skipped:
without a Docker engine these tests fail."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CONTROL, REPLICA, EXAMPLES = (
    f"kubeforge:{VERSION}",
    f"kubeforge-replica:{VERSION}",
    f"kubeforge-examples:{VERSION}",
)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="session")
def docker() -> str:
    """The docker client of a running engine (images/engine.sh starts one if need be)."""
    out = subprocess.run(
        [str(ROOT / "images" / "engine.sh"), "start"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"no Docker engine: {out.stderr}"
    client = out.stdout.strip().splitlines()[-1]
    for image in (CONTROL, REPLICA, EXAMPLES):
        found = subprocess.run([client, "image", "inspect", image], capture_output=True)
        assert found.returncode == 0, f"{image} is not built: run `make images`"
    return client


def _run(docker: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


COMMANDS = [
    (CONTROL, ["kubeforge", "--help"]),
    (CONTROL, ["kubeforge", "operator", "--help"]),
    (CONTROL, ["python", "-m", "kubeforge.router", "--help"]),
    (REPLICA, ["python", "-m", "kubeforge.replica", "--help"]),
    (EXAMPLES, ["python", "-m", "kubeforge.replica", "--help"]),
]


@pytest.mark.parametrize(
    ("image", "argv"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_commands_answer_as_non_root_on_a_read_only_root(
    docker: str, image: str, argv: list[str]
) -> None:
    out = _run(docker, "run", "--rm", "--read-only", "--cap-drop", "ALL", image, *argv)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower(), out.stdout
    who = _run(docker, "run", "--rm", "--read-only", image, "id", "-u")
    assert who.stdout.strip() == "1000", who


def test_examples_are_baked_into_the_user_image(docker: str) -> None:
    out = _run(
        docker,
        "run",
        "--rm",
        "--read-only",
        EXAMPLES,
        "python",
        "-c",
        "from kubeforge.actor import load_actor_class as load; print(load('examples.echo:Echo'))",
    )
    assert out.returncode == 0 and "Echo" in out.stdout, out.stderr


def test_the_examples_image_runs_torch_collectives_on_cpu(docker: str) -> None:
    """The examples image is built on the torch base: torch imports as the non-root user on a
    read-only root, gloo is there, and the collectives example loads."""
    script = (
        "import torch, torch.distributed as d; "
        "from kubeforge.actor import load_actor_class as load; "
        "print(torch.__version__.split('+')[0], d.is_gloo_available(), "
        "load('examples.collectives:Collectives').__name__)"
    )
    out = _run(docker, "run", "--rm", "--read-only", EXAMPLES, "python", "-c", script)
    assert out.returncode == 0, out.stderr
    pinned = next(
        d.split("==")[1]
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]["dev"]
        if d.startswith("torch==")
    )
    assert out.stdout.split() == [pinned, "True", "Collectives"], out.stdout


# The examples image is 5.9 GB (torch's wheel carries CUDA's libraries): reading every layer of
# it took about 60 s here, the tier's default limit, when `docker save` wrote it to disk first.
@pytest.mark.timeout(600)
def test_no_build_secret_in_any_layer(docker: str) -> None:
    """The machine's CA bundle reached pip as a build secret only: no layer of any image holds
    a file with its bytes, and nothing is left under /run/secrets. Images are read as they are
    saved, through a pipe, and their layers as streams: nothing of them is written to disk."""
    assert CA_BUNDLE.is_file(), "this machine has no CA bundle to look for"
    bundle = hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()
    for image in (CONTROL, REPLICA, EXAMPLES):
        save = subprocess.Popen(
            [docker, "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert save.stdout is not None
        layers = 0
        with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
            for member in outer:
                if not (member.isfile() and member.name.endswith("layer.tar")):
                    continue
                layers += 1
                layer = outer.extractfile(member)
                assert layer is not None
                with tarfile.open(fileobj=layer, mode="r|") as inner:
                    for f in inner:
                        assert not f.name.startswith("run/secrets/"), (image, f.name)
                        if f.isfile() and f.name.endswith(".crt"):
                            data = inner.extractfile(f).read()  # type: ignore[union-attr]
                            assert hashlib.sha256(data).hexdigest() != bundle, (image, f.name)
        _, err = save.communicate(timeout=60)
        assert save.returncode == 0, err.decode(errors="replace")
        assert layers, f"{image}: no layers in the saved image"


@pytest.fixture
def network(docker: str) -> Iterator[tuple[str, list[str]]]:
    """A Docker network of this test's own, and the containers started on it; both removed."""
    name = f"kf-test-{secrets.token_hex(4)}"
    assert _run(docker, "network", "create", name).returncode == 0
    containers: list[str] = []
    try:
        yield name, containers
    finally:
        if containers:
            _run(docker, "rm", "-f", *containers)
        _run(docker, "network", "rm", name)


def _wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout}s")


def _post(url: str, body: dict, token: str) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_router_and_replicas_serve_calls_from_the_images(
    docker: str, network: tuple[str, list[str]]
) -> None:
    """As the operator runs them: explicit commands, uid 1000, read-only root, every capability
    dropped; then `docker stop` ends each with exit 0 (SIGTERM to PID 1, drained)."""
    net, containers = network
    token = secrets.token_hex(16)
    hardened = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    names = [f"{net}-replica-{i}" for i in range(2)]
    for name in names:
        out = _run(
            docker, "run", "-d", "--name", name, "--network", net, *hardened,
            "-e", f"KUBEFORGE_TOKEN={token}", "-e", f"KUBEFORGE_REPLICA_NAME={name}",
            EXAMPLES, "python", "-m", "kubeforge.replica", "--actor", "examples.echo:Echo",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        containers.append(name)
    router = f"{net}-router"
    replica_flags = [arg for name in names for arg in ("--replica", f"http://{name}:8000")]
    out = _run(
        docker, "run", "-d", "--name", router, "--network", net, *hardened,
        "-p", "127.0.0.1::8080", "-e", f"KUBEFORGE_TOKEN={token}",
        CONTROL, "python", "-m", "kubeforge.router", *replica_flags,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    containers.append(router)
    port = _run(docker, "port", router, "8080/tcp").stdout.strip().rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    assert _post(url + "/v1/call/echo", {"args": ["hi"]}, token) == {"result": "hi"}
    broadcast = _post(url + "/v1/call_all/echo", {"args": [1]}, token)
    assert broadcast["results"] == [1, 1] and broadcast["errors"] == {}, broadcast
    with pytest.raises(urllib.error.HTTPError) as refused:  # the token is required
        _post(url + "/v1/call/echo", {"args": ["hi"]}, "wrong")
    assert refused.value.code == 401
    for name in containers:
        stopped = _run(docker, "stop", "-t", "20", name, timeout=40)
        assert stopped.returncode == 0, stopped.stderr
        code = _run(docker, "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", f"{name} exited with {code}: {_run(docker, 'logs', name).stderr}"
