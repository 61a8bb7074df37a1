"""A node that runs the pods bound to it as local processes, reporting status like a kubelet.

Each pod gets its own loopback address (127.0.0.x, passed as KUBEFORGE_BIND_HOST and reported
as the pod IP), every container's command/args run as a process with the pod's environment,
httpGet probes decide start-up, readiness and liveness, exits are restarted with back-off per
restartPolicy, and deletion sends SIGTERM, waits the grace period, then SIGKILL. Images are not
pulled: containers run with this repo's Python environment. Pods with a service account get a
token from the TokenRequest API in a per-pod kubeconfig (KUBECONFIG), so in-pod clients act as
that account and RBAC is really enforced. Secret volumes are written into the pod's work
directory and kept current (`devcluster.volumes`); env values naming their mount paths point there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from devcluster import volumes
from devcluster.controlplane import write_kubeconfig
from kubeforge.contract import LABEL_PREFIX

log = logging.getLogger("devcluster.node")
VENV_BIN = Path(sys.executable).parent


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    spec: Any
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: str | None = None
    last_exit: dict[str, Any] | None = None
    waiting: str | None = None  # reason while not running (ContainerCreating, CrashLoopBackOff)
    ready: bool = False
    done: bool = False  # exited and will not restart
    probe_failures: int = 0


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    ip: str
    containers: dict[str, Container]
    restart_policy: str
    grace: int
    env_base: dict[str, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    stopping: bool = False
    workdir: Path | None = None
    reports: int = 0  # status reports begun; a retry of an older one gives way to a newer
    reporting: asyncio.Lock = field(default_factory=asyncio.Lock)  # one report at a time
    message: str | None = None  # why its containers wait, for the next report
    volumes: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name: (Secret, dir)


class ProcessNode:
    def __init__(
        self,
        kubeconfig: Path,
        server: str,
        ca: Path,
        workdir: Path,
        name: str = "e2e-node",
        gpus: int = 4,
        ip_prefix: str = "127.0.0.",
        max_pods: int = 110,
        backoff: float = 1.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.server = server
        self.ca = ca
        self.workdir = workdir
        self.name = name
        self.gpus = gpus
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.pods: dict[str, PodRun] = {}  # by uid
        self.free_ips = [f"{ip_prefix}{i}" for i in range(2, 255)]
        self.frozen = False
        # One loopback address per pod: beyond 253 pods, more from 127.100.0.0/16.
        more = max_pods - len(self.free_ips)
        self.free_ips += [f"127.100.{i // 250}.{2 + i % 250}" for i in range(max(more, 0))]
        self.max_pods = max_pods
        self.api: client.ApiClient | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._terminations: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.api = await config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        await self._register()
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        self._tasks.append(asyncio.create_task(self._watch_pods()))
        self._tasks.append(asyncio.create_task(self._watch_secrets()))

    async def freeze(self) -> None:
        """Lose the machine: no heartbeat, no status, no watch, and its processes stop answering
        (SIGSTOP), as a hung or cut-off host's would. `stop()` still ends them (SIGKILL)."""
        self.frozen = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for run in self.pods.values():
            for c in run.containers.values():
                if c.proc is not None and c.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.proc.pid, signal.SIGSTOP)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(self._kill_pod(run, grace=2) for run in list(self.pods.values())),
            return_exceptions=True,
        )
        if self._http is not None:
            await self._http.close()
        if self.api is not None:
            await self.api.close()

    # the Node and its heartbeat -------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        capacity = {
            "cpu": "16",
            "memory": "64Gi",
            "pods": str(self.max_pods),
            "nvidia.com/gpu": str(self.gpus),
        }
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process node is posting ready status",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                },
                *(
                    {
                        "type": t,
                        "status": "False",
                        "reason": f"KubeletHasNo{t}",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                    for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
                ),
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.36.3-process",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://1",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def _register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    LABEL_PREFIX + "process-node": "true",
                },
            },
        }
        with contextlib.suppress(ApiException):
            await self.core.create_node(body)
        await self.core.patch_node_status(self.name, {"status": self._node_status()})
        try:
            await self.coord.create_namespaced_lease("kube-node-lease", self._lease())
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _lease(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": now},
        }

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(10)
            try:
                await self.coord.patch_namespaced_lease(
                    self.name, "kube-node-lease", {"spec": self._lease()["spec"]}
                )
                await self.core.patch_node_status(self.name, {"status": self._node_status()})
            except (ApiException, aiohttp.ClientError) as exc:
                log.warning("heartbeat failed: %s", exc)

    # pods ---------------------------------------------------------------------------------

    async def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.name}"
        while True:
            try:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        self.core.list_pod_for_all_namespaces,
                        field_selector=selector,
                        timeout_seconds=300,
                    ):
                        await self._on_pod(event["type"], event["object"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pod watch failed; restarting it")
                await asyncio.sleep(1)

    async def _watch_secrets(self) -> None:
        """Keep secret volumes current, as the kubelet does (it takes up to a minute or so;
        this node writes at once)."""
        while True:
            try:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        self.core.list_secret_for_all_namespaces, timeout_seconds=300
                    ):
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._update_volumes(event["object"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("secret watch failed; restarting it")
                await asyncio.sleep(1)

    def _update_volumes(self, secret: Any) -> None:
        meta = secret.metadata
        for run in self.pods.values():
            for name, directory in run.volumes.values():
                if run.namespace == meta.namespace and name == meta.name:
                    volumes.write_atomic(directory, _secret_files(secret))

    async def _write_volumes(self, pod: Any, run: PodRun) -> None:
        for volume in pod.spec.volumes or []:
            if volume.secret is None:
                continue
            name = volume.secret.secret_name
            secret = await self.core.read_namespaced_secret(name, pod.metadata.namespace)
            directory = run.workdir / "volumes" / volume.name  # type: ignore[operator]
            volumes.write_atomic(directory, _secret_files(secret))
            run.volumes[volume.name] = (name, directory)

    async def _on_pod(self, kind: str, pod: Any) -> None:
        uid = pod.metadata.uid
        run = self.pods.get(uid)
        if kind == "DELETED":
            if run is not None:
                await self._kill_pod(run, grace=0)
            return
        if pod.metadata.deletion_timestamp is not None:
            if run is not None and not run.stopping:
                grace = pod.metadata.deletion_grace_period_seconds
                run.stopping = True
                task = asyncio.create_task(self._terminate(run, pod, grace))
                self._terminations.add(task)
                task.add_done_callback(self._terminations.discard)
            elif run is None:
                await self._force_delete(pod)
            return
        if run is None and pod.status.phase in (None, "Pending"):
            await self._start_pod(pod)

    async def _start_pod(self, pod: Any) -> None:
        meta, spec = pod.metadata, pod.spec
        ip = self.free_ips.pop(0)
        workdir = self.workdir / f"{meta.namespace}_{meta.name}_{meta.uid[:8]}"
        workdir.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            meta.namespace,
            meta.name,
            meta.uid,
            ip,
            {c.name: Container(c, waiting="ContainerCreating") for c in spec.containers},
            spec.restart_policy or "Always",
            spec.termination_grace_period_seconds
            if spec.termination_grace_period_seconds is not None
            else 30,
            workdir=workdir,
        )
        self.pods[meta.uid] = run
        try:
            run.env_base = await self._pod_env(pod, run)
            await self._write_volumes(pod, run)
        except Exception as exc:  # a missing secret, say: report it as a kubelet would
            log.warning("pod %s/%s cannot start: %s", meta.namespace, meta.name, exc)
            for c in run.containers.values():
                c.waiting = "CreateContainerConfigError"
            await self._report(run, message=str(exc))
            return
        for c in run.containers.values():
            run.tasks.append(asyncio.create_task(self._supervise(pod, run, c)))
        await self._report(run)

    async def _pod_env(self, pod: Any, run: PodRun) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(run.workdir),
            "HOSTNAME": pod.metadata.name,
            "KUBEFORGE_BIND_HOST": run.ip,
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": self.server.rsplit(":", 1)[1],
        }
        sa = pod.spec.service_account_name
        if sa and pod.spec.automount_service_account_token is not False:
            token = await self.core.create_namespaced_service_account_token(
                sa,
                pod.metadata.namespace,
                {
                    "spec": {
                        "audiences": [],
                        "expirationSeconds": 3600,
                        "boundObjectRef": {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "name": pod.metadata.name,
                            "uid": pod.metadata.uid,
                        },
                    }
                },
            )
            path = write_kubeconfig(
                run.workdir / "kubeconfig",
                self.server,
                self.ca,
                f"system:serviceaccount:{pod.metadata.namespace}:{sa}",
                token=token.status.token,
                namespace=pod.metadata.namespace,  # in-pod clients default to their namespace
            )
            env["KUBECONFIG"] = str(path)
            env["POD_NAMESPACE"] = pod.metadata.namespace
        return env

    async def _container_env(self, pod: Any, run: PodRun, c: Any) -> dict[str, str]:
        env = dict(run.env_base)
        for source in c.env_from or []:
            data = await self._env_source(pod.metadata.namespace, source)
            env.update({f"{source.prefix or ''}{k}": v for k, v in data.items()})
        for var in c.env or []:
            if var.value_from is None:
                env[var.name] = _expand(var.value or "", env)
                continue
            vf = var.value_from
            if vf.field_ref is not None:
                env[var.name] = _field(pod, run, vf.field_ref.field_path)
            elif vf.secret_key_ref is not None:
                ref = vf.secret_key_ref
                secret = await self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                env[var.name] = base64.b64decode((secret.data or {})[ref.key]).decode()
            elif vf.config_map_key_ref is not None:
                ref = vf.config_map_key_ref
                cm = await self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace)
                env[var.name] = (cm.data or {})[ref.key]
        mounts = {
            m.mount_path: run.volumes[m.name][1]
            for m in c.volume_mounts or []
            if m.name in run.volumes
        }
        return volumes.remap(env, mounts)

    async def _env_source(self, namespace: str, source: Any) -> dict[str, str]:
        if source.config_map_ref is not None:
            cm = await self.core.read_namespaced_config_map(source.config_map_ref.name, namespace)
            return dict(cm.data or {})
        secret = await self.core.read_namespaced_secret(source.secret_ref.name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    async def _supervise(self, pod: Any, run: PodRun, c: Container) -> None:
        """Run one container: start, probe, restart with back-off, until the pod stops."""
        spec = c.spec
        argv = [*(spec.command or []), *(spec.args or [])]
        if not argv:
            c.waiting, c.done = "CreateContainerError", True
            await self._report(
                run,
                message=f"container {spec.name} has no command: images "
                "are not run on the process node",
            )
            return
        try:
            env = await self._container_env(pod, run, spec)
        except Exception as exc:
            c.waiting, c.done = "CreateContainerConfigError", True
            await self._report(run, message=str(exc))
            return
        argv = [_expand(a, env) for a in argv]
        delay = self.backoff
        while not run.stopping:
            exe = shutil.which(argv[0], path=env["PATH"]) or argv[0]
            log_path = run.workdir / f"{spec.name}.log"  # type: ignore[operator]
            with log_path.open("ab") as out:
                c.proc = await asyncio.create_subprocess_exec(
                    exe,
                    *argv[1:],
                    env=env,
                    cwd=spec.working_dir or os.getcwd(),
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            c.started_at, c.waiting, c.ready, c.probe_failures = _now(), None, False, 0
            await self._report(run)
            probes = asyncio.create_task(self._probe(run, c))
            code = await c.proc.wait()
            probes.cancel()
            c.ready = False
            c.last_exit = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": _now(),
            }
            if run.stopping:
                break
            again = run.restart_policy == "Always" or (
                run.restart_policy == "OnFailure" and code != 0
            )
            if not again:
                c.done = True
                await self._report(run)
                return
            c.restarts += 1
            c.waiting = "CrashLoopBackOff"
            await self._report(run)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_cap)

    async def _probe(self, run: PodRun, c: Container) -> None:
        spec = c.spec
        readiness, liveness = spec.readiness_probe, spec.liveness_probe
        startup = spec.startup_probe
        if readiness is None:
            c.ready = True
            await self._report(run)
        start = asyncio.get_running_loop().time()
        probes = [p for p in (startup, readiness, liveness) if p]
        if not probes:
            return
        period = min(min(p.period_seconds or 10 for p in probes), 1)  # tests do not wait 10 s
        live_fail = startup_fail = 0
        while True:
            await asyncio.sleep(period)
            if self.frozen:
                continue
            if startup is not None:  # as the kubelet: the other probes wait until it passes
                if await self._http_probe(run, spec, startup):
                    startup, start = None, asyncio.get_running_loop().time()
                else:
                    startup_fail += 1
                    if startup_fail >= (startup.failure_threshold or 3) and c.proc:
                        return self._kill_for(run, c, "startup")
                    continue
            elapsed = asyncio.get_running_loop().time() - start
            if readiness is not None and elapsed >= (readiness.initial_delay_seconds or 0):
                ok = await self._http_probe(run, spec, readiness)
                if ok != c.ready:
                    c.ready = ok
                    await self._report(run)
            if liveness is not None and elapsed >= (liveness.initial_delay_seconds or 0):
                if await self._http_probe(run, spec, liveness):
                    live_fail = 0
                else:
                    live_fail += 1
                    if live_fail >= (liveness.failure_threshold or 3) and c.proc:
                        return self._kill_for(run, c, "liveness")

    def _kill_for(self, run: PodRun, c: Container, probe: str) -> None:
        """A probe failed too often: the container's processes go, and its runner restarts it."""
        log.info("%s/%s: %s probe failed, restarting", run.name, c.spec.name, probe)
        assert c.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)

    async def _http_probe(self, run: PodRun, spec: Any, probe: Any) -> bool:
        action = probe.http_get
        if action is None:
            return True  # exec/tcp probes: treated as passing on the process node
        port = action.port
        if isinstance(port, str) and not port.isdigit():
            port = next((p.container_port for p in spec.ports or [] if p.name == port), 0)
        scheme = (action.scheme or "HTTP").lower()
        url = f"{scheme}://{run.ip}:{int(port)}{action.path or '/'}"
        try:  # as the kubelet: an HTTPS probe does not verify the certificate
            async with self._http.get(url, ssl=False) as resp:  # type: ignore[union-attr]
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _report(self, run: PodRun, message: str | None = None) -> None:
        """Send the pod's status as it is when sent. One report at a time per pod, each built
        once it holds the lock: two in flight at once could land out of order and leave an
        older state (not ready, say) as the last word."""
        if self.frozen:
            return
        if message is not None:
            run.message = message
        # A status that never arrives leaves a pod unready for good (a container without probes
        # reports once): under load, try a few times, unless a newer report waits to go.
        run.reports += 1
        seq = run.reports
        async with run.reporting:
            for attempt in range(5):
                if run.reports != seq or self.frozen:
                    return
                try:
                    await self.core.patch_namespaced_pod_status(
                        run.name, run.namespace, {"status": self._status(run)}
                    )
                    return
                except ApiException as exc:
                    if exc.status == 404:
                        return
                    log.warning("status of %s/%s: %s", run.namespace, run.name, exc.reason)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("status of %s/%s: %s", run.namespace, run.name, exc)
                await asyncio.sleep(0.2 * 2**attempt)

    def _status(self, run: PodRun) -> dict[str, Any]:
        message = run.message
        statuses = []
        for c in run.containers.values():
            running = c.proc is not None and c.proc.returncode is None and not c.waiting
            if running:
                state = {"running": {"startedAt": c.started_at}}
            elif c.done and c.last_exit:
                state = {"terminated": c.last_exit}
            else:
                state = {
                    "waiting": {
                        "reason": c.waiting or "ContainerCreating",
                        **({"message": message} if message else {}),
                    }
                }
            statuses.append(
                {
                    "name": c.spec.name,
                    "ready": c.ready and running,
                    "restartCount": c.restarts,
                    "image": c.spec.image or "",
                    "imageID": "",
                    "containerID": f"process://{c.proc.pid}" if c.proc else None,
                    "started": running,
                    "state": state,
                    **({"lastState": {"terminated": c.last_exit}} if c.last_exit else {}),
                }
            )
        all_ready = all(s["ready"] for s in statuses)
        done = [c for c in run.containers.values() if c.done]
        phase = "Running"
        if len(done) == len(run.containers) and done:
            phase = (
                "Succeeded"
                if all(c.last_exit and c.last_exit["exitCode"] == 0 for c in done)
                else "Failed"
            )
        elif not any(s["started"] for s in statuses) and not any(
            c.last_exit for c in run.containers.values()
        ):
            phase = "Pending"
        cond = "True" if all_ready and phase == "Running" else "False"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.containers and _now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": cond},
                {"type": "Ready", "status": cond},
            ],
            "containerStatuses": statuses,
        }
        return status

    async def _terminate(self, run: PodRun, pod: Any, grace: int | None) -> None:
        await self._kill_pod(run, grace=run.grace if grace is None else min(grace, run.grace))
        await self._force_delete(pod)

    async def _kill_pod(self, run: PodRun, grace: float) -> None:
        """SIGTERM every container, wait up to `grace`, SIGKILL the rest."""
        run.stopping = True
        procs = [
            c.proc
            for c in run.containers.values()
            if c.proc is not None and c.proc.returncode is None
        ]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for task in run.tasks:
            task.cancel()
        if self.pods.pop(run.uid, None) is not None:
            self.free_ips.append(run.ip)

    async def _force_delete(self, pod: Any) -> None:
        """Confirm the pod's end to the API server, as a kubelet does, until it is gone: a
        confirmation lost under load would leave it Terminating (holding its GPUs) until the
        pod watch next lists it."""
        for attempt in range(8):
            try:
                await self.core.delete_namespaced_pod(
                    pod.metadata.name,
                    pod.metadata.namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions={"uid": pod.metadata.uid}
                    ),
                )
                return
            except ApiException as exc:
                if exc.status in (404, 409):  # gone, or a new pod under its name
                    return
                log.warning("delete of %s: %s", pod.metadata.name, exc.reason)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("delete of %s: %s", pod.metadata.name, exc)
            await asyncio.sleep(0.2 * 2**attempt)


def _secret_files(secret: Any) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _field(pod: Any, run: PodRun, path: str) -> str:
    meta = pod.metadata
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "status.podIP": run.ip,
        "status.hostIP": "127.0.0.1",
        "status.podIPs": run.ip,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name or "",
    }
    if path in simple:
        return str(simple[path])
    for prefix, source in (
        ("metadata.labels", meta.labels),
        ("metadata.annotations", meta.annotations),
    ):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return (source or {}).get(path[len(prefix) + 2 : -2], "")
    raise ValueError(f"fieldRef {path!r} is not supported on the process node")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    for name, value in env.items():
        text = text.replace(f"$({name})", value)
    return text
