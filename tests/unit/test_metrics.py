import pytest

from kubeforge.metrics import (
    DURATION_BUCKETS,
    Histogram,
    SlidingWindow,
    _bucket_of,
    _value_of,
    percentiles,
)
from kubeforge.prom import Exposition


def test_rate_counts_only_calls_inside_the_window() -> None:
    w = SlidingWindow(start=0.0, window_s=10.0, bucket_s=1.0)
    for i in range(100):  # 10 calls/s for 10 s
        w.record(i * 0.1, 0.001)
    assert w.stats(9.99).count == 100
    assert w.stats(9.99).rate == pytest.approx(10.0, rel=0.02)
    # 15 s later, nothing left: old buckets fall out of the window, whatever their count.
    assert w.stats(25.0).count == 0
    assert w.stats(25.0).rate == 0.0


def test_young_window_rate_uses_elapsed_time_not_window_length() -> None:
    w = SlidingWindow(start=100.0, window_s=60.0)
    for i in range(20):
        w.record(100.0 + i * 0.1, 0.001)
    assert w.stats(102.0).rate == pytest.approx(10.0, rel=0.01)


def test_no_sample_cap() -> None:
    w = SlidingWindow(start=0.0, window_s=60.0)
    for i in range(200_000):
        w.record(1.0 + i * 1e-5, 0.002)
    assert w.stats(3.0).count == 200_000


def test_percentiles_and_errors() -> None:
    w = SlidingWindow(start=0.0, window_s=60.0)
    for i in range(1, 101):  # latencies 1..100 ms, every 10th fails
        w.record(1.0, i / 1000, ok=i % 10 != 0)
    s = w.stats(2.0)
    assert s.errors == 10 and s.error_rate == pytest.approx(0.1)
    assert s.p50 == pytest.approx(0.050, rel=0.07)
    assert s.p95 == pytest.approx(0.095, rel=0.07)
    assert s.p99 == pytest.approx(0.099, rel=0.07)
    assert s.avg_latency == pytest.approx(0.0505, rel=1e-6)


def test_histogram_resolution_is_within_seven_percent() -> None:
    for micros in (1.5, 37, 999, 12_345, 2_000_000):
        seconds = micros / 1e6
        assert _value_of(_bucket_of(seconds)) == pytest.approx(seconds, rel=0.07)


def test_percentiles_of_nothing_are_zero() -> None:
    assert percentiles({}, 0, (0.5, 0.99)) == [0.0, 0.0]


def test_bad_window_is_rejected() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0.0, window_s=1.0, bucket_s=2.0)


def test_merged_windows_add_rates_and_merge_histograms() -> None:
    from kubeforge.metrics import merged_stats

    fast, slow = SlidingWindow(0.0, 10.0), SlidingWindow(0.0, 10.0)
    for i in range(90):
        fast.record(i * 0.1, 0.001)
    for i in range(10):
        slow.record(i * 0.9, 0.100, ok=False)
    s = merged_stats([fast, slow], 9.5)
    assert s.count == 100 and s.errors == 10
    assert s.rate == pytest.approx(fast.stats(9.5).rate + slow.stats(9.5).rate)
    # p50 sits among the fast calls, p95 among the slow ones: merged, not averaged.
    assert s.p50 == pytest.approx(0.001, rel=0.07)
    assert s.p95 == pytest.approx(0.100, rel=0.07)
    assert merged_stats([], 1.0).count == 0


def test_duration_histogram_is_cumulative_with_prometheus_buckets() -> None:
    hist = Histogram()
    for seconds in (0.0002, 0.003, 0.003, 0.2, 700.0):
        hist.observe(seconds)
    buckets = dict(hist.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 3 and buckets["0.25"] == 4
    assert buckets["300.0"] == 4 and buckets["+Inf"] == 5 == hist.count
    assert list(buckets)[-1] == "+Inf" and len(buckets) == len(DURATION_BUCKETS) + 1
    assert hist.sum == pytest.approx(700.2062)
    exp = Exposition()
    exp.histogram("x_seconds", "help", [({"replica": "r"}, hist)])
    text = exp.render().decode()
    assert 'x_seconds_bucket{replica="r",le="+Inf"} 5.0' in text
    assert 'x_seconds_count{replica="r"} 5.0' in text and "# TYPE x_seconds histogram" in text
