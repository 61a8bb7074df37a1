"""Defaults are written once (kubeforge/settings.py), and every spec setting the router uses
reaches it the same way on every path: flags for `kubeforge run` and the router Deployment,
and the resource it follows while running."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kubeforge import ServiceConfig
from kubeforge._runtime import duration, format_duration
from kubeforge.api import ServiceSpec
from kubeforge.operator.manifests import pod_template, router_objects
from kubeforge.replica.__main__ import parser as replica_parser
from kubeforge.replica.server import ReplicaConfig
from kubeforge.router.__main__ import parser as router_parser
from kubeforge.router.engine import RouterConfig
from kubeforge.router.k8s_discovery import router_settings
from kubeforge.settings import (
    DEFAULTS,
    REPLICA_IMAGE,
    VERSION,
    router_request_timeout,
    termination_grace_seconds,
)

SPECS = [
    {"actor": "examples.counter:Counter"},
    {
        "actor": "examples.counter:Counter",
        "healthPollRate": "50ms",
        "requestTimeout": "5m",
        "drainGrace": "90s",
        "maxConcurrentRequests": 3,
    },
]


def _body(spec: dict) -> dict:
    return {"metadata": {"name": "svc", "namespace": "ns", "uid": "u"}, "spec": spec}


def _router_args(spec: dict) -> list[str]:
    (deployment, _) = router_objects(_body(spec))
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("spec", SPECS)
def test_router_deployment_carries_every_router_setting_of_the_spec(spec: dict) -> None:
    """The flags the Deployment passes and what a running router follows agree, key by key."""
    parsed = router_parser().parse_args(_router_args(spec))
    stored = ServiceSpec.model_validate(spec).model_dump(by_alias=True)  # defaults filled
    followed = router_settings(stored)
    assert followed, "the router follows no setting of the resource"
    for key, value in followed.items():
        assert getattr(parsed, key) == pytest.approx(value), key
    assert followed["request_timeout"] == router_request_timeout(duration(stored["requestTimeout"]))


@pytest.mark.parametrize("spec", SPECS)
def test_kubeforge_run_and_the_operator_start_the_same_processes(spec: dict) -> None:
    model = ServiceSpec.model_validate(spec)
    container = pod_template(_body(spec))["spec"]["containers"][0]
    assert container["args"][-len(model.replica_flags()) :] == model.replica_flags()
    assert _router_args(spec)[-len(model.router_flags()) :] == model.router_flags()
    replica = replica_parser().parse_args(["--actor", spec["actor"], *model.replica_flags()])
    assert replica.request_timeout == model.request_timeout_seconds
    assert replica.drain_grace == model.drain_grace_seconds
    assert replica.max_concurrent_requests == model.max_concurrent_requests


@pytest.mark.parametrize("spec", SPECS)
def test_the_kubelet_waits_out_the_replica_drain(spec: dict) -> None:
    template = pod_template(_body(spec))
    grace = template["spec"]["terminationGracePeriodSeconds"]
    drain = ServiceSpec.model_validate(spec).drain_grace_seconds
    assert grace == termination_grace_seconds(drain) and grace > drain


def test_a_pod_template_overlay_cannot_shorten_the_kubelet_grace() -> None:
    spec = {**SPECS[0], "podTemplate": {"spec": {"terminationGracePeriodSeconds": 1}}}
    grace = pod_template(_body(spec))["spec"]["terminationGracePeriodSeconds"]
    assert grace == termination_grace_seconds(DEFAULTS.drain_grace)


def test_every_default_comes_from_one_place() -> None:
    spec = ServiceSpec.model_validate(SPECS[0])
    assert duration(spec.health_poll_rate) == DEFAULTS.health_poll_rate
    assert duration(spec.request_timeout) == DEFAULTS.request_timeout
    assert duration(spec.drain_grace) == DEFAULTS.drain_grace
    assert spec.max_concurrent_requests == DEFAULTS.max_concurrent_requests

    cfg = ServiceConfig(num_replicas=1)
    assert cfg.health_poll_rate == DEFAULTS.health_poll_rate
    assert cfg.request_timeout == DEFAULTS.request_timeout
    assert cfg.replica_max_concurrent_requests == DEFAULTS.max_concurrent_requests
    assert cfg.replica_max_queued_requests == DEFAULTS.max_queued_requests
    assert cfg.session_ttl == DEFAULTS.session_ttl

    replica = replica_parser().parse_args(["--actor", "a:B"])
    rc = ReplicaConfig(actor="a:B")
    for field in ("request_timeout", "session_ttl", "drain_grace", "max_body"):
        assert getattr(replica, field) == getattr(rc, field) == getattr(DEFAULTS, field), field
    assert replica.port == rc.port == DEFAULTS.replica_port

    router = router_parser().parse_args([])
    rtc = RouterConfig()
    for field in ("health_poll_rate", "health_timeout", "retries", "max_body"):
        assert getattr(router, field) == getattr(rtc, field) == getattr(DEFAULTS, field), field
    assert router.request_timeout == rtc.request_timeout
    assert router.request_timeout == router_request_timeout(DEFAULTS.request_timeout)


def test_defaults_are_sane() -> None:
    d = dataclasses.asdict(DEFAULTS)
    assert all(v > 0 for v in d.values())
    assert DEFAULTS.request_timeout > DEFAULTS.health_poll_rate
    assert router_request_timeout(DEFAULTS.request_timeout) > DEFAULTS.request_timeout


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "200ms"),
        (0.01, "10ms"),
        (1.5, "1500ms"),
        (1005.5, "1005500ms"),
        (25, "25s"),
        (60, "1m"),
        (3600, "1h"),
    ],
)
def test_durations_round_trip(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert duration(text) == pytest.approx(seconds)


def test_default_images_are_this_version() -> None:
    container = pod_template(_body(SPECS[0]))["spec"]["containers"][0]
    assert container["image"] == REPLICA_IMAGE == f"kubeforge-replica:{VERSION}"
    router = router_objects(_body(SPECS[0]))[0]["spec"]["template"]["spec"]["containers"][0]
    assert router["image"] == f"kubeforge:{VERSION}"
    assert not VERSION.endswith("latest")


def test_the_chart_ships_this_version() -> None:
    """The chart's operator image is its appVersion: the routers and replicas it starts by
    default must be of the same version."""
    chart = yaml.safe_load((Path(__file__).parents[2] / "charts/kubeforge/Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION


def _restricted(pod_spec: dict) -> None:
    """What the `restricted` Pod Security Standard asks of a pod and its containers."""
    pod = pod_spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod_spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_every_pod_written_passes_the_restricted_standard() -> None:
    _restricted(pod_template(_body(SPECS[0]))["spec"])
    router = router_objects(_body(SPECS[0]))[0]["spec"]["template"]["spec"]
    _restricted(router)
    assert router["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
