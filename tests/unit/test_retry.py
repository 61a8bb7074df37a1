"""The one rule for re-sending a failed attempt (router/retry.py), as a table."""

from __future__ import annotations

import pytest

from kubeforge.router.retry import MAX_BACKOFF, Outcome, decide

C, L, T, OV, D, AB = (
    Outcome.CONNECT,
    Outcome.LOST,
    Outcome.TIMEOUT,
    Outcome.OVERLOADED,
    Outcome.DRAINING,
    Outcome.ABANDONED,
)

# outcome, attempt, budget, at_most_once, in_session, others -> re-send?
TABLE = [
    # never reached the actor: any call may go on, session or not
    (C, 0, 3, False, False, 2, True),
    (C, 0, 3, True, True, 1, True),
    (D, 0, 3, False, True, 1, True),
    (D, 2, 3, True, False, 1, True),
    # overload keeps a session where it is
    (OV, 0, 3, False, False, 1, True),
    (OV, 0, 3, False, True, 1, False),
    # lost with its replica: only without a session, and not at-most-once
    (L, 0, 3, False, False, 1, True),
    (L, 0, 3, True, False, 1, False),
    (L, 0, 3, False, True, 1, False),
    # a timeout may still be running: never
    (T, 0, 3, False, False, 5, False),
    # the caller stopped sending its body: there is nothing whole to send anywhere
    (AB, 0, 3, False, False, 5, False),
    # the budget: `retries` re-sends, no more; zero means none at all
    (C, 3, 3, False, False, 1, False),
    (C, 0, 0, False, False, 1, False),
    (OV, 0, 0, False, False, 1, False),
    (D, 0, 0, False, False, 1, False),
    (L, 0, 0, False, False, 1, False),
    # nowhere else to go
    (C, 0, 3, False, False, 0, False),
    (OV, 0, 3, False, False, 0, False),
    (D, 1, 3, False, True, 0, False),
]


@pytest.mark.parametrize(
    ("outcome", "attempt", "budget", "amo", "session", "others", "want"), TABLE
)
def test_decide(
    outcome: Outcome,
    attempt: int,
    budget: int,
    amo: bool,
    session: bool,
    others: int,
    want: bool,
) -> None:
    decision = decide(outcome, attempt, budget, at_most_once=amo, in_session=session, others=others)
    assert decision.resend is want, decision.why
    assert decision.why


def test_only_a_refused_connect_backs_off_and_the_pause_is_bounded() -> None:
    pauses = [
        decide(C, a, 100, at_most_once=False, in_session=False, others=1, backoff_base=0.01).backoff
        for a in range(10)
    ]
    assert pauses[:3] == [0.01, 0.02, 0.04]
    assert max(pauses) == MAX_BACKOFF
    for outcome in (L, OV, D):
        assert decide(outcome, 0, 3, at_most_once=False, in_session=False, others=1).backoff == 0


def test_what_takes_a_replica_out_of_rotation() -> None:
    assert {o for o in Outcome if o.unhealthy_reason} == {C, L, D}


def test_no_re_send_past_the_deadline() -> None:
    args = {"at_most_once": False, "in_session": False, "others": 2}
    assert decide(C, 0, 3, time_left=0.5, **args).resend
    late = decide(C, 0, 3, time_left=0.0, **args)
    assert not late.resend and "deadline" in late.why


@pytest.mark.parametrize("outcome", list(Outcome))
def test_a_streamed_body_goes_on_only_after_a_refused_connect(outcome: Outcome) -> None:
    """A body larger than the router holds streams to its replica and is gone once it flowed:
    only a connect that never happened (nothing sent) may be tried elsewhere."""
    kept = decide(outcome, 0, 3, at_most_once=False, in_session=False, others=2)
    streamed = decide(
        outcome, 0, 3, at_most_once=False, in_session=False, others=2, replayable=False
    )
    if outcome is Outcome.CONNECT:
        assert streamed == kept and streamed.resend
    elif outcome is Outcome.ABANDONED:  # its own reason comes first
        assert not streamed.resend and "caller" in streamed.why
    else:
        assert not streamed.resend and "streamed" in streamed.why
