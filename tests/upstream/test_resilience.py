"""Outlier ejection and the retry budget as state machines, on a clock the tests move."""

from __future__ import annotations

import pytest

from guard.upstream.resilience import Breaker, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def breaker(clock, rand=0.0, **kwargs) -> Breaker:
    # rand 0.0: every ejection lasts exactly half its span, so times are exact.
    return Breaker(**{"threshold": 3, "base_seconds": 10.0, "max_seconds": 60.0, **kwargs}, clock=clock, rand=lambda: rand)


def test_ejects_after_threshold_consecutive_failures_only(clock):
    b = breaker(clock)
    assert [b.failed(), b.failed()] == [False, False]
    b.succeeded()  # a success in between starts the count again
    assert [b.failed(), b.failed()] == [False, False] and not b.ejected
    assert b.failed() is True
    assert b.ejected and b.ejected_until == clock.now + 5.0 and b.ejection_seconds == 5.0


def test_backoff_doubles_per_ejection_with_jitter_and_a_cap(clock):
    b = breaker(clock, rand=1.0)  # the whole span
    spans = []
    for _ in range(3):
        b.failed()
    spans.append(b.ejection_seconds)
    for _ in range(4):
        clock.now = b.ejected_until
        assert b.sent() is True  # the trial...
        b.failed(trial=True)  # ...fails: ejected again, at once
        spans.append(b.ejection_seconds)
    assert spans == [10.0, 20.0, 40.0, 60.0, 60.0]
    jittered = breaker(clock, rand=0.5)
    for _ in range(3):
        jittered.failed()
    assert jittered.ejection_seconds == 7.5  # between half and all of the span


def test_failures_of_requests_sent_before_the_ejection_do_not_escalate_it(clock):
    b = breaker(clock, rand=1.0)
    for _ in range(3):
        b.failed()
    assert b.ejection_seconds == 10.0
    # Requests already in flight when it was ejected fail one after another, milliseconds apart.
    assert [b.failed(), b.failed(), b.failed()] == [False, False, False]
    assert b.ejection_seconds == 10.0 and b.ejected_until == clock.now + 10.0


def test_one_trial_after_the_backoff_then_success_readmits(clock):
    b = breaker(clock)
    for _ in range(3):
        b.failed()
    clock.now += 4.9
    assert b.ejected and not b.sent()  # still ejected: a request forced here is no trial
    clock.now += 0.2
    assert not b.ejected and b.awaiting_trial
    assert b.sent() is True
    assert b.ejected and b.sent() is False  # while the trial is in flight nobody else goes
    b.succeeded()
    assert not b.ejected and b.ejected_until is None and b.failures == 0 and b.ejections == 0


def test_a_trial_whose_caller_went_away_frees_the_slot(clock):
    b = breaker(clock)
    for _ in range(3):
        b.failed()
    clock.now += 5.0
    trial = b.sent()
    b.released(trial)
    assert b.awaiting_trial and b.sent() is True


def test_health_probe_readmits_on_probation_after_the_backoff_only(clock):
    b = breaker(clock)
    for _ in range(3):
        b.failed()
    assert b.probed(True) is None and b.ejected  # during the backoff a passing probe changes nothing
    clock.now += 5.0
    assert b.probed(True) is True and not b.ejected and b.ejected_until is None
    # /health can pass while generation fails: one more failure ejects again, for longer.
    assert b.failed() is True and b.ejection_seconds == 10.0
    clock.now += 10.0
    assert b.probed(False) is False and b.ejected and b.ejection_seconds == 20.0
    assert breaker(clock).probed(False) is None  # a probe never ejects an endpoint in service


def test_threshold_must_be_positive(clock):
    with pytest.raises(ValueError):
        Breaker(threshold=0)


def test_retry_budget_is_a_ratio_of_recent_requests_plus_a_reserve(clock):
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0, clock=clock)
    granted = [budget.try_retry() for _ in range(10)]
    assert granted.count(True) == 5  # the reserve: 0.5/s over 10 s
    for _ in range(20):
        budget.requested()
    assert [budget.try_retry() for _ in range(10)].count(True) == 4  # 20% of 20 requests
    clock.now += 10.0  # all of it slid out of the window
    assert [budget.try_retry() for _ in range(10)].count(True) == 5


def test_retry_budget_bounds_a_dead_fleet_to_the_ratio(clock):
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0, clock=clock)
    retries = 0
    for _ in range(1000):  # 100 requests a second, each wanting two retries
        clock.now += 0.01
        budget.requested()
        retries += budget.try_retry() + budget.try_retry()
    assert 195 <= retries <= 205
