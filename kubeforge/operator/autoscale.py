"""The autoscaler's decision: from the load the routers publish, how many replicas. Pure.

The load is the calls open at the routers (running or queued at replicas: `status.metrics.
inFlight`), sampled whenever the routers publish a change; a sample holds until the next one.
Each sample recommends `ceil(load / targetInFlight)` replicas, within [min, max]. As the
Horizontal Pod Autoscaler's stabilization windows do, a scale-up goes to the lowest
recommendation of the last `scaleUpDelay` (the load was at least that high all along), and a
scale-down to the highest of the last `scaleDownDelay` (it was at most that low all along), so
a burst or a lull shorter than its window moves nothing and the count never flaps.

GPU-aware: while replica pods cannot be scheduled, the count does not grow, and it comes down
to one unschedulable pod at most, so a full cluster never collects pending pods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class Why(StrEnum):
    """The reason of a decision: the Service's `status.autoscaler.reason` and event reason."""

    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    OUT_OF_BOUNDS = "OutOfBounds"
    AT_CAPACITY = "AtCapacity"
    STABLE = "Stable"
    NO_METRICS = "NoMetrics"


@dataclass(frozen=True)
class Policy:
    """spec.autoscaling, in numbers."""

    min_replicas: int
    max_replicas: int
    target_in_flight: float
    scale_up_delay: float  # seconds
    scale_down_delay: float

    def recommend(self, load: float) -> int:
        wanted = math.ceil(load / self.target_in_flight - 1e-9) if load > 0 else 0
        return max(self.min_replicas, min(self.max_replicas, wanted))

    @property
    def memory(self) -> float:
        """How far back samples matter."""
        return max(self.scale_up_delay, self.scale_down_delay)


@dataclass(frozen=True)
class Sample:
    at: float  # seconds (any clock, the same for all samples and `now`)
    load: float


@dataclass(frozen=True)
class Decision:
    replicas: int
    why: Why
    message: str
    recheck_in: float | None = None  # seconds until a pending change could be decided

    @property
    def changes(self) -> bool:
        return self.why in (Why.SCALE_UP, Why.SCALE_DOWN, Why.OUT_OF_BOUNDS, Why.AT_CAPACITY)


@dataclass
class Load:
    """The samples of one Service, in the operator's memory: a restarted operator starts
    afresh, which only delays the next change by one window."""

    samples: list[Sample] = field(default_factory=list)

    def observe(self, load: float | None, now: float, policy: Policy) -> list[Sample]:
        """Take the load the status shows now, if it is news; drop what no window needs."""
        if load is not None and (not self.samples or self.samples[-1].load != load):
            self.samples.append(Sample(now, float(load)))
        self.samples = forget(self.samples, policy, now)
        return self.samples


def forget(samples: list[Sample], policy: Policy, now: float) -> list[Sample]:
    """The samples a decision can still need: those of the longer window, and the one that was
    in force when it began."""
    start = now - policy.memory
    kept = [s for s in samples if s.at > start]
    older = [s for s in samples if s.at <= start]
    return older[-1:] + kept


def decide(
    policy: Policy,
    current: int,
    samples: list[Sample],
    now: float,
    unschedulable: int = 0,
    scheduler_says: str = "",
) -> Decision:
    """The replica count for now; `current` is spec.replicas, `unschedulable` the replica pods
    the scheduler could not place (with its message)."""
    if unschedulable:
        # Hold at what the cluster can place, plus the one pending pod that shows it is full;
        # scale-up resumes once that pod schedules.
        capped = max(policy.min_replicas, min(current, current - unschedulable + 1))
        return Decision(
            capped,
            Why.AT_CAPACITY,
            f"{unschedulable} replica(s) cannot be scheduled; holding at {capped}: "
            f"{scheduler_says}",
        )
    bounded = max(policy.min_replicas, min(policy.max_replicas, current))
    if bounded != current:
        return Decision(
            bounded,
            Why.OUT_OF_BOUNDS,
            f"{current} replicas is outside [{policy.min_replicas}, {policy.max_replicas}]",
        )
    if not samples:
        return Decision(current, Why.NO_METRICS, "no load published by a router yet")
    up = _settled(policy, samples, now, policy.scale_up_delay, min)
    down = _settled(policy, samples, now, policy.scale_down_delay, max)
    load = samples[-1].load
    latest = policy.recommend(load)
    if up is not None and up > current:
        return Decision(
            up,
            Why.SCALE_UP,
            f"load {load:g} over {current} replicas is above the target of "
            f"{policy.target_in_flight:g} per replica for {policy.scale_up_delay:g}s",
        )
    if down is not None and down < current:
        return Decision(
            down,
            Why.SCALE_DOWN,
            f"load {load:g} needs {down} replicas or fewer for {policy.scale_down_delay:g}s",
        )
    return Decision(
        current,
        Why.STABLE,
        f"load {load:g}, {policy.target_in_flight:g} per replica: {current} replicas",
        _pending(samples, now, current, latest, policy),
    )


def _settled(policy: Policy, samples: list[Sample], now: float, window: float, pick) -> int | None:
    """The lowest (scale-up) or highest (scale-down) recommendation in force during the last
    `window` seconds, or None when the samples do not reach back that far yet."""
    start = now - window
    if samples[0].at > start:
        return None
    in_force = [s for s in samples if s.at <= start][-1:] + [s for s in samples if s.at > start]
    return pick(policy.recommend(s.load) for s in in_force)


def _pending(
    samples: list[Sample], now: float, current: int, latest: int, policy: Policy
) -> float | None:
    """When a change the latest samples point to would be decided, if no sample comes first:
    the end of the window that began with the current run of samples on that side."""
    if latest == current:
        return None
    up = latest > current
    run_start = samples[-1].at
    for s in reversed(samples):
        rec = policy.recommend(s.load)
        if (rec <= current) if up else (rec >= current):
            break
        run_start = s.at
    window = policy.scale_up_delay if up else policy.scale_down_delay
    return max(0.0, run_start + window - now)
