"""Per-endpoint outlier ejection and a client-wide retry budget.

Both are plain state machines over an injected clock (and random source), so
their timing is tested without sleeping; the upstream client feeds them outcomes.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable


class Breaker:
    """Ejects an endpoint after `threshold` consecutive failures, for a backoff that doubles per
    ejection (capped; each draw is between half and all of it, so endpoints ejected together
    come back at different times).

    When the backoff ends, one trial decides: a request sent to the endpoint, or a /health
    probe. Success re-admits it (a probe only on probation: the next failure ejects it again,
    since /health can pass while generation fails); failure ejects it again, for longer.
    A request that succeeds resets everything.
    """

    def __init__(
        self,
        threshold: int = 5,
        base_seconds: float = 10.0,
        max_seconds: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._rand = rand
        self.failures = 0  # consecutive
        self.ejections = 0  # consecutive, the backoff's exponent
        self.ejected_until: float | None = None  # set from an ejection until a success re-admits
        self.ejection_seconds = 0.0  # the last ejection's length
        self.trial = False  # a request is the trial now

    @property
    def ejected(self) -> bool:
        """True while the backoff runs, or its trial is in flight: not to be chosen if another endpoint can be."""
        return self.ejected_until is not None and (self.trial or self._clock() < self.ejected_until)

    @property
    def awaiting_trial(self) -> bool:
        return self.ejected_until is not None and not self.ejected

    def sent(self) -> bool:
        """A request goes to the endpoint; True when it is the trial (report its outcome or `released`)."""
        if self.awaiting_trial:
            self.trial = True
            return True
        return False

    def released(self, trial: bool) -> None:
        """The request ended with no verdict on the endpoint (the caller went away)."""
        if trial:
            self.trial = False

    def succeeded(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until = None
        self.trial = False

    def failed(self, trial: bool = False) -> bool:
        """Counts a failure; True when it ejects the endpoint.

        While ejected, only the trial's failure (or one after the backoff) ejects again: requests sent
        before the ejection failing one after another must not escalate the backoff within milliseconds.
        """
        if self.ejected_until is not None:
            if trial or not self.ejected:
                self._eject()
                return True
            return False
        self.failures += 1
        if self.failures >= self.threshold:
            self._eject()
            return True
        return False

    def probed(self, ok: bool) -> bool | None:
        """A /health result; after the backoff it is the trial. True: re-admitted, False: ejected again, None: no change."""
        if not self.awaiting_trial:
            return None
        if ok:
            self.ejected_until = None
            self.failures = self.threshold - 1
            return True
        self._eject()
        return False

    def _eject(self) -> None:
        self.ejections += 1
        span = min(self.max_seconds, self.base_seconds * 2 ** (self.ejections - 1))
        self.ejection_seconds = span * (0.5 + 0.5 * self._rand())
        self.ejected_until = self._clock() + self.ejection_seconds
        self.trial = False


class RetryBudget:
    """Retries allowed over a sliding `window`: `ratio` of the requests in it, plus `min_per_second`.

    A dead fleet then sees at most that many extra requests instead of a multiple of its traffic,
    while a quiet client can still retry a few.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 5.0,
        window: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.reserve = min_per_second * window
        self.window = window
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def requested(self) -> None:
        """A first attempt (retries are not counted here: they do not earn more retries)."""
        self._requests.append(self._clock())

    def try_retry(self) -> bool:
        """Spends one retry if the budget has one left."""
        now = self._clock()
        for times in (self._requests, self._retries):
            while times and times[0] <= now - self.window:
                times.popleft()
        if len(self._retries) >= self.ratio * len(self._requests) + self.reserve:
            return False
        self._retries.append(now)
        return True
