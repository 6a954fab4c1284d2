"""Per-tenant rate limits: token buckets for requests and for model tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

from guard.access.keys import RateLimit
from guard.errors import ResourceExhausted


class TokenBucket:
    """Holds up to `capacity`, refilled at `rate` per second. May go into debt (charged after the fact)."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.level = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: available now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class TenantLimiter:
    """The buckets of one tenant's `rate_limit`."""

    def __init__(self, tenant: str, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenant = tenant
        self.limit = limit
        self.requests = None
        self.tokens = None
        if limit.requests_per_second is not None:
            burst = limit.burst or max(1, round(limit.requests_per_second))
            self.requests = TokenBucket(limit.requests_per_second, burst, clock)
        if limit.tokens_per_minute is not None:
            self.tokens = TokenBucket(limit.tokens_per_minute / 60.0, limit.tokens_per_minute, clock)

    def admit(self) -> None:
        """Counts one request, or raises ResourceExhausted with when to retry."""
        if self.tokens is not None:
            # Tokens are charged when a request ends, so a tenant in debt waits until it is repaid.
            wait = self.tokens.wait_for(1)
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit: tenant {self.tenant!r} used its {self.limit.tokens_per_minute} tokens per minute; "
                    f"retry after {wait:.1f} s",
                    retry_after=wait,
                )
        if self.requests is not None:
            wait = self.requests.wait_for(1)
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit: tenant {self.tenant!r} exceeds {self.limit.requests_per_second:g} requests per second; "
                    f"retry after {wait:.2f} s",
                    retry_after=wait,
                )
            self.requests.take(1)

    def charge_tokens(self, count: int) -> None:
        if self.tokens is not None and count > 0:
            self.tokens.take(count)
