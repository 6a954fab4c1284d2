"""Token buckets: refill capped at capacity, debt, and a TenantLimiter's default burst."""

from __future__ import annotations

import pytest

from guard.access.keys import RateLimit
from guard.access.ratelimit import TenantLimiter, TokenBucket
from guard.errors import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_and_refill_is_capped_at_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=clock)
    assert bucket.wait_for(3) == 0.0
    bucket.take(3)
    assert bucket.wait_for(1) == pytest.approx(0.5)
    clock.now += 3600  # a long idle time refills to capacity, no further
    assert bucket.wait_for(3) == 0.0
    assert bucket.level == pytest.approx(3.0)
    assert bucket.wait_for(4) == pytest.approx(0.5)


def test_a_bucket_may_go_into_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=10.0, clock=clock)
    bucket.take(25)
    assert bucket.wait_for(1) == pytest.approx(16.0)
    clock.now += 10
    assert bucket.wait_for(1) == pytest.approx(6.0)


def test_idle_time_after_a_burst_only_restores_the_burst() -> None:
    clock = Clock()
    limiter = TenantLimiter("acme", RateLimit(requests_per_second=1, burst=2), clock)
    clock.now += 1000
    limiter.admit()
    limiter.admit()
    with pytest.raises(ResourceExhausted) as raised:
        limiter.admit()
    assert raised.value.retry_after == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(5.0, 5), (0.2, 1), (2.6, 3)])
def test_the_default_burst_is_one_seconds_worth_and_at_least_one(rate: float, burst: int) -> None:
    clock = Clock()
    limiter = TenantLimiter("acme", RateLimit(requests_per_second=rate), clock)
    for _ in range(burst):
        limiter.admit()
    with pytest.raises(ResourceExhausted):
        limiter.admit()


def test_a_refused_request_is_not_counted() -> None:
    clock = Clock()
    limiter = TenantLimiter("acme", RateLimit(requests_per_second=1, burst=1), clock)
    limiter.admit()
    for _ in range(5):
        with pytest.raises(ResourceExhausted):
            limiter.admit()
    clock.now += 1.0
    limiter.admit()


def test_a_request_refused_for_tokens_does_not_use_a_request() -> None:
    clock = Clock()
    limiter = TenantLimiter("acme", RateLimit(requests_per_second=0.1, burst=1, tokens_per_minute=60), clock)
    limiter.charge_tokens(60)
    with pytest.raises(ResourceExhausted, match="tokens per minute"):
        limiter.admit()
    clock.now += 1.0
    limiter.admit()  # the request bucket still holds its one request (it refills only 0.1 a second)
