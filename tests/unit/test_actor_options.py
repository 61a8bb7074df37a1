"""`Actor.options()`: torchforge's configured subclass, checked at once, loaded as its base."""

from __future__ import annotations

import pytest

from examples.counter import Counter
from kubeforge.actor import actor_class, endpoints_of, import_path_of
from kubeforge.service import ServiceConfig, service_config


def test_options_returns_a_configured_subclass_and_leaves_the_class_alone() -> None:
    two = Counter.options(num_replicas=2, procs=2, health_poll_rate=0.5)
    four = Counter.options(num_replicas=4)
    assert issubclass(two, Counter) and two.__name__ == "Counter"
    assert (two.num_replicas, two.procs, two.with_gpus, two.hosts) == (2, 2, False, None)
    assert (four.num_replicas, four.procs) == (4, 1)
    assert (Counter.num_replicas, Counter.procs) == (1, 1)
    assert service_config(two._service_options) == ServiceConfig(
        num_replicas=2, procs=2, health_poll_rate=0.5
    )
    assert endpoints_of(two) == endpoints_of(Counter)


def test_options_chain_and_replicas_load_the_base_class() -> None:
    chained = Counter.options(num_replicas=3).options(procs=2)
    assert (chained.num_replicas, chained.procs) == (3, 2)
    assert actor_class(chained) is Counter
    assert import_path_of(chained) == import_path_of(Counter) == "examples.counter:Counter"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_replica": 2}, TypeError, r"unknown option\(s\) num_replica; ServiceConfig takes: "),
        ({"replicas": 2, "gpus": 1}, TypeError, r"unknown option\(s\) gpus, replicas"),
        ({"num_replicas": 0}, ValueError, "num_replicas must be a positive integer"),
        ({"procs": 0}, ValueError, "procs must be a positive integer"),
        ({"health_poll_rate": 0}, ValueError, "health_poll_rate must be > 0"),
    ],
)
def test_bad_options_fail_at_options_not_at_start(
    options: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Counter.options(**options)


def test_default_config_is_one_replica_of_one_rank() -> None:
    cfg = service_config({})
    assert (cfg.num_replicas, cfg.procs, cfg.hosts, cfg.return_first_rank_result) == (
        1,
        1,
        None,
        True,
    )
