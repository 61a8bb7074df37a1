"""The native relay's tallies (relay/src/tally.rs) against Python's metrics: a tally folded into
a replica's window and histogram leaves exactly what recording its calls one by one does."""

from __future__ import annotations

import random

from kubeforge import _relay, metrics  # type: ignore[attr-defined]
from kubeforge.metrics import DURATION_BUCKETS, SlidingWindow
from kubeforge.router.core import Replica


def _replica(index: int) -> Replica:
    return Replica(
        index=index,
        name=f"r{index}",
        url=f"http://127.0.0.1:{9000 + index}",
        window=SlidingWindow(0.0),
    )


def _latencies(rng: random.Random, n: int) -> list[float]:
    """Every scale a call's latency has, and the edges: each bucket bound exactly, under a
    microsecond, zero."""
    out = [*DURATION_BUCKETS, 0.0, 1e-7, 1e-6, 3e-6, 1e-3, 400.0]
    out += [10 ** rng.uniform(-7, 2.7) for _ in range(n)]
    return out


def test_a_folded_tally_is_its_calls_recorded_one_by_one() -> None:
    rng = random.Random(7)
    samples = [(rng.choice((0, 2)), s, rng.random() > 0.1) for s in _latencies(rng, 5000)]
    one_by_one = {i: _replica(i) for i in (0, 2)}
    folded = {i: _replica(i) for i in (0, 2)}
    now = 12.5
    for index, seconds, ok in samples:
        one_by_one[index].record(now, seconds, ok)
    tallies = _relay.tally_samples(samples, metrics.SCALE)
    assert [t[0] for t in tallies] == [0, 2]
    for index, *tally in tallies:
        folded[index].record_tally(now, *tally)
    for i in (0, 2):
        a, b = one_by_one[i], folded[i]
        assert (a.total_requests, a.successful_requests, a.failed_requests) == (
            b.total_requests,
            b.successful_requests,
            b.failed_requests,
        )
        slot_a = next(s for s in a.window.slots if s.epoch == 12)
        slot_b = next(s for s in b.window.slots if s.epoch == 12)
        assert (slot_a.count, slot_a.errors, slot_a.hist) == (
            slot_b.count,
            slot_b.errors,
            slot_b.hist,
        )
        assert slot_a.latency_sum == slot_b.latency_sum  # summed in the same order
        assert a.durations.counts == b.durations.counts
        assert (a.durations.count, a.durations.sum) == (b.durations.count, b.durations.sum)
        assert a.window.stats(now) == b.window.stats(now)


def test_a_tally_adds_to_what_the_window_holds() -> None:
    replica = _replica(0)
    replica.record(3.2, 0.004, True)
    ((_, *tally),) = _relay.tally_samples([(0, 0.004, False), (0, 0.2, True)], metrics.SCALE)
    replica.record_tally(3.7, *tally)
    stats = replica.window.stats(3.7)
    assert (stats.count, stats.errors) == (3, 1)
    assert replica.durations.count == 3
    assert replica.total_requests == 3 and replica.failed_requests == 1
