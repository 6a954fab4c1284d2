"""gather_or_cancel: a failure cancels the siblings and surfaces as itself."""

from __future__ import annotations

import asyncio

import pytest

from guard.concurrency import gather_or_cancel
from guard.upstream.client import UpstreamUnavailable


async def test_results_in_order():
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert await gather_or_cancel(value(1, 0.02), value(2, 0.0), value(3, 0.01)) == [1, 2, 3]


async def test_a_failure_cancels_the_others_and_is_raised_unwrapped():
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fail() -> None:
        await asyncio.sleep(0.01)
        raise UpstreamUnavailable("no upstream")

    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(gather_or_cancel(forever(), fail(), forever()), timeout=5)
    assert cancelled.is_set()


async def test_cancelling_the_caller_cancels_every_task():
    started, cancelled = asyncio.Event(), []

    async def forever(index: int) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    outer = asyncio.create_task(gather_or_cancel(forever(0), forever(1)))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(cancelled) == [0, 1]
