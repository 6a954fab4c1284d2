"""Cross-request batching for sources that compute locally.

Concurrent requests queue; a drain task scores the queued requests in one call
on the worker thread as soon as it is free, so requests that arrive during a
pass share the next one. With `max_wait` > 0 it first lingers until the oldest
has waited that long (or the queue holds `max_batch_tokens`). Results go back to each request's
future. If a pooled call fails, its requests are re-run one by one, so only the
request that caused the failure sees it.
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from guard.rerank.base import RerankError, RerankObserver, RewardSource, ScoreRequest

P = TypeVar("P")


@dataclass
class Runtime:
    """What every local source of one Reranker shares."""

    # Model compute. One thread: concurrent forward passes on one device only contend.
    worker: ThreadPoolExecutor
    # Tokenization, kept off the worker so it never queues behind a forward pass.
    prep: ThreadPoolExecutor
    max_wait: float
    max_batch_tokens: int
    observer: RerankObserver


@dataclass
class _Pending(Generic[P]):
    item: P
    tokens: int
    arrived: float
    future: asyncio.Future[list[float]] = field(repr=False)


class Batcher(Generic[P]):
    def __init__(self, run: Callable[[list[P]], list[list[float]]], runtime: Runtime) -> None:
        self._run_sync = run
        self._runtime = runtime
        self._queue: deque[_Pending[P]] = deque()
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: P, tokens: int) -> list[float]:
        loop = asyncio.get_running_loop()
        pending = _Pending(item, tokens, loop.time(), loop.create_future())
        self._queue.append(pending)
        self._wake.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        # A cancelled caller cancels its future; the drainer then skips it.
        return await pending.future

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(RerankError("reranker closed"))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            # Bounded wait: give concurrent requests a chance to join, measured from the oldest arrival.
            while sum(p.tokens for p in self._queue) < self._runtime.max_batch_tokens:
                remaining = self._queue[0].arrived + self._runtime.max_wait - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._score(batch)

    def _take(self) -> list[_Pending[P]]:
        batch: list[_Pending[P]] = []
        tokens = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if batch and tokens + pending.tokens > self._runtime.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += pending.tokens
        return batch

    async def _score(self, batch: list[_Pending[P]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._runtime.worker, self._run_sync, [p.item for p in batch])
        except Exception as exc:  # noqa: BLE001 - routed to the callers
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            for pending in batch:
                await self._score([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)


class LocalSource(RewardSource, Generic[P]):
    """A source computing in this process: `prepare` per request, `score_batch` over pooled requests.

    Both run on the runtime's threads, never on the event loop.
    """

    # How long close() lets requests already scoring finish.
    CLOSE_GRACE_SECONDS = 30.0

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._batcher: Batcher[P] = Batcher(self.score_batch, runtime)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @abstractmethod
    def prepare(self, request: ScoreRequest) -> P:
        """Tokenize one request; raise RerankError for a request this source cannot score."""

    @abstractmethod
    def cost(self, prepared: P) -> int:
        """Tokens the request adds to a pooled batch."""

    @abstractmethod
    def score_batch(self, prepared: Sequence[P]) -> list[list[float]]:
        """Scores for every request, in order (runs on the worker thread)."""

    async def score(self, request: ScoreRequest, *, timeout: float | None = None) -> list[float]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(timeout):
                prepared = await loop.run_in_executor(self.runtime.prep, self.prepare, request)
                scores = await self._batcher.submit(prepared, self.cost(prepared))
        except RerankError:
            raise
        except TimeoutError:
            raise RerankError(f"{self.kind}: no score within {timeout:.3g}s") from None
        except Exception as exc:
            raise RerankError(f"{self.kind}: {exc!r}") from exc
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        self.runtime.observer.scored(self.kind, len(request.candidates), time.perf_counter() - started)
        return scores

    def warm(self) -> None:
        """One pass over a made-up request on the worker, so the first real one finds kernels and memory ready."""
        self.score_batch([self.prepare(ScoreRequest("Hello?", ("Hi there.", "Hello! How can I help you today?")))])

    async def close(self) -> None:
        """Lets requests already scoring finish (an older policy version's, after a reload), then stops."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.CLOSE_GRACE_SECONDS)
        except TimeoutError:
            pass  # the batcher fails whatever is still queued
        await self._batcher.close()
