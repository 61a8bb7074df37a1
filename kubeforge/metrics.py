"""Sliding time windows of call outcomes and latencies: pure, no clock of their own.

A window is a ring of fixed-width time buckets, each with a count, an error count and a sparse
log-scale latency histogram (8 sub-buckets per power of two, ~6% resolution). Rates and
percentiles cover exactly the calls of the last `window_s` seconds, however many there were:
there is no sample cap, and memory does not grow with the request rate.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from kubeforge.settings import DEFAULTS

_SUB = 8  # histogram sub-buckets per power of two


def _bucket_of(seconds: float) -> int:
    micros = seconds * 1e6
    if micros < 1.0:
        return 0
    mantissa, exponent = math.frexp(micros)  # micros = mantissa * 2**exponent, mantissa in [.5, 1)
    return exponent * _SUB + int((mantissa - 0.5) * 2 * _SUB)


def _value_of(bucket: int) -> float:
    """Mid-point of a histogram bucket, in seconds."""
    if bucket == 0:
        return 0.0
    exponent, sub = divmod(bucket, _SUB)
    mantissa = 0.5 + (sub + 0.5) / (2 * _SUB)
    return math.ldexp(mantissa, exponent) / 1e6


class _Slot:
    __slots__ = ("count", "epoch", "errors", "hist", "latency_sum")

    def __init__(self) -> None:
        self.epoch = -1
        self.count = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.hist: dict[int, int] = {}

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.count = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.hist = {}


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    count: int
    errors: int
    rate: float  # calls per second over the window
    error_rate: float  # fraction of calls in the window that failed
    avg_latency: float  # seconds
    p50: float
    p95: float
    p99: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "window_seconds": self.window_s,
            "requests": self.count,
            "errors": self.errors,
            "request_rate": self.rate,
            "error_rate": self.error_rate,
            "avg_latency": self.avg_latency,
            "p50_latency": self.p50,
            "p95_latency": self.p95,
            "p99_latency": self.p99,
        }


class SlidingWindow:
    def __init__(
        self, start: float, window_s: float = DEFAULTS.metrics_window, bucket_s: float = 1.0
    ) -> None:
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError("need 0 < bucket_s <= window_s")
        self.start = start
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.slots = [_Slot() for _ in range(math.ceil(window_s / bucket_s))]

    def record(self, now: float, latency: float, ok: bool = True) -> None:
        epoch = int(now / self.bucket_s)
        slot = self.slots[epoch % len(self.slots)]
        if slot.epoch != epoch:
            slot.reset(epoch)
        slot.count += 1
        if not ok:
            slot.errors += 1
        slot.latency_sum += latency
        key = _bucket_of(latency)
        slot.hist[key] = slot.hist.get(key, 0) + 1

    def record_tally(
        self, now: float, count: int, errors: int, latency_sum: float, hist: list[tuple[int, int]]
    ) -> None:
        """`count` calls that ended by `now`, tallied on this window's scale elsewhere (the
        native relay: see `SCALE`): what recording each would have done, in one step."""
        epoch = int(now / self.bucket_s)
        slot = self.slots[epoch % len(self.slots)]
        if slot.epoch != epoch:
            slot.reset(epoch)
        slot.count += count
        slot.errors += errors
        slot.latency_sum += latency_sum
        for key, n in hist:
            slot.hist[key] = slot.hist.get(key, 0) + n

    def _live(self, now: float) -> list[_Slot]:
        newest = int(now / self.bucket_s)
        oldest = newest - len(self.slots) + 1
        return [s for s in self.slots if oldest <= s.epoch <= newest]

    def stats_count(self, now: float) -> int:
        return sum(s.count for s in self._live(now))

    def span(self, now: float) -> float:
        """Seconds the window covers now: shorter while young (at least one bucket), then
        exactly `window_s`."""
        newest = int(now / self.bucket_s)
        covered = (len(self.slots) - 1) * self.bucket_s + (now - newest * self.bucket_s)
        # Never less than one bucket: a rate over a few milliseconds says nothing useful.
        return max(min(covered, now - self.start), self.bucket_s)

    def stats(self, now: float) -> WindowStats:
        return merged_stats([self], now)


def merged_stats(windows: list[SlidingWindow], now: float) -> WindowStats:
    """One set of figures over several windows of equal length (a service's replicas).

    Rates add up; percentiles come from the merged histograms, not from averaging percentiles.
    """
    if not windows:
        return WindowStats(0.0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    live = [slot for w in windows for slot in w._live(now)]
    count = sum(s.count for s in live)
    errors = sum(s.errors for s in live)
    hist: dict[int, int] = {}
    for s in live:
        for k, v in s.hist.items():
            hist[k] = hist.get(k, 0) + v
    p50, p95, p99 = percentiles(hist, count, (0.50, 0.95, 0.99))
    return WindowStats(
        window_s=windows[0].window_s,
        count=count,
        errors=errors,
        rate=sum(w.stats_count(now) / w.span(now) for w in windows),
        error_rate=errors / count if count else 0.0,
        avg_latency=sum(s.latency_sum for s in live) / count if count else 0.0,
        p50=p50,
        p95=p95,
        p99=p99,
    )


def percentiles(hist: dict[int, int], count: int, qs: tuple[float, ...]) -> list[float]:
    """Latency at each quantile in `qs` (ascending) from a merged histogram."""
    if count == 0:
        return [0.0 for _ in qs]
    out: list[float] = []
    targets = iter(qs)
    q = next(targets)
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        while seen >= q * count:
            out.append(_value_of(key))
            nxt = next(targets, None)
            if nxt is None:
                return out
            q = nxt
    while len(out) < len(qs):
        out.append(_value_of(max(hist)))
    return out


# Upper bounds (seconds) of the latency histograms on /metrics: from a no-op call on loopback to
# a long generation; Prometheus adds +Inf.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


# The scale a tally elsewhere must count on to fold into these windows and histograms: the
# native relay tallies its calls on it (relay/src/tally.rs), Python keeps the arithmetic.
SCALE = (_SUB, DURATION_BUCKETS)


class Histogram:
    """Call durations since the process started, in fixed buckets: what Prometheus's
    `histogram_quantile` aggregates across replicas and routers (window percentiles cannot be
    added up; these can)."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets  # upper bounds; batch sizes use BATCH_BUCKETS
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def observe_tally(self, counts: list[int], total: float) -> None:
        """Calls counted per bucket elsewhere (the native relay), `total` seconds together."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.count += sum(counts)
        self.sum += total

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, calls at or below it) for every bucket, +Inf last."""
        out, seen = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            seen += n
            out.append(("+Inf" if bound == math.inf else repr(bound), seen))
        return out
