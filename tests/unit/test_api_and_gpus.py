import pytest

from kubeforge.api import ManifestError, parse_manifest
from kubeforge.gpus import GpuError, assign, visible_gpus
from kubeforge.service_api import ServiceMetrics

GOOD = {
    "apiVersion": "kubeforge.dev/v1alpha1",
    "kind": "Service",
    "metadata": {"name": "policy"},
    "spec": {
        "replicas": 4,
        "gpusPerReplica": 2,
        "actor": "models.policy:Policy",
        "healthPollRate": "500ms",
        "requestTimeout": "2m",
        "kwargs": {"size": "7b"},
    },
}


def test_manifest_defaults_and_durations() -> None:
    m = parse_manifest(GOOD)
    assert m.spec.replicas == 4 and m.spec.gpus_per_replica == 2
    assert m.spec.health_poll_seconds == 0.5 and m.spec.request_timeout_seconds == 120.0
    assert m.spec.max_concurrent_requests == 10 and m.spec.router.replicas == 1


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"replicas": -1}, "spec.replicas"),
        ({"gpusPerReplica": -1}, "spec.gpusPerReplica"),
        ({"healthPollRate": "fast"}, "spec.healthPollRate"),
        ({"actor": "no-colon"}, "spec.actor"),
        ({"maxConcurrentRequests": 0}, "spec.maxConcurrentRequests"),
        ({"replicaz": 3}, "spec.replicaz"),
    ],
)
def test_invalid_specs_name_the_field(patch: dict, field: str) -> None:
    doc = {**GOOD, "spec": {**GOOD["spec"], **patch}}
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_manifest(doc)


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(ManifestError, match="expected apiVersion"):
        parse_manifest({**GOOD, "apiVersion": "v1"})


def test_gpu_assignment_is_disjoint() -> None:
    assert assign(2, 2, ["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    assert assign(1, 1, ["3"]) == [["3"]]
    with pytest.raises(GpuError, match="need 3 GPUs; this machine has 2 \\(0, 1\\)"):
        assign(3, 1, ["0", "1"])


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_service_metrics_from_summary() -> None:
    summary = {
        "service": {"total_sessions": 4, "healthy_replicas": 1, "total_replicas": 2},
        "replicas": {
            "0": {
                "state": "HEALTHY",
                "request_rate": 3.0,
                "queue_depth": 2,
                "capacity_utilization": 0.5,
                "extra_key": 1,
            },
            "1": {
                "state": "UNHEALTHY",
                "request_rate": 1.0,
                "queue_depth": 9,
                "capacity_utilization": 1.0,
            },
        },
    }
    m = ServiceMetrics.from_summary(summary)
    assert m.get_total_request_rate() == 4.0
    assert m.get_avg_queue_depth() == 2.0  # over healthy replicas, as torchforge
    assert m.get_avg_capacity_utilization() == 0.5
    assert m.get_sessions_per_replica() == 2.0
    assert m.replica_metrics[0].get_request_rate() == 3.0
