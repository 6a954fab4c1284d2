"""The Reranker: one per server; builds reward sources from policy config and keeps them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import torch

from guard.concurrency import gather_or_cancel
from guard.policy.reward import (
    EmbeddingReward,
    LMJudgeReward,
    RemoteReward,
    RewardConfig,
    SequenceClassifierReward,
    TrainedReward,
    WeightedReward,
)
from guard.rerank import selection
from guard.rerank.base import NullObserver, Prompt, RerankError, RerankObserver, RewardSource, ScoreRequest
from guard.rerank.batching import Runtime
from guard.rerank.remote import RemoteSource

log = logging.getLogger(__name__)


class WeightedSource(RewardSource):
    """Sum of weighted sources; each child is shared with any policy that uses it alone."""

    kind = "weighted"

    def __init__(self, children: Sequence[tuple[float, RewardSource]]) -> None:
        self.children = list(children)

    async def score(self, request: ScoreRequest, *, timeout: float | None = None) -> list[float]:
        results = await gather_or_cancel(*(source.score(request, timeout=timeout) for _, source in self.children))
        return [
            sum(weight * scores[i] for (weight, _), scores in zip(self.children, results, strict=True))
            for i in range(len(request.candidates))
        ]


class Reranker:
    """Scores best-of-n candidates with any configured reward source, and selects among them.

    Sources are cached by config, so policies naming the same model share it and
    its batches. `retain` keeps exactly the sources the loaded policies name: it
    loads and warms new ones in the background when a policy loads (a request
    then waits for that load instead of starting one) and closes the ones no
    policy names any more, once their queued work is done, so a reload never
    leaks a model. Model compute runs on one worker thread; the event loop only awaits.
    """

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        # 0: a pass starts as soon as the worker is free, and what arrives meanwhile joins the next one.
        # Lingering for company cost every lone best_of_n request the whole wait (benchmarks/step_cost.py:
        # 12 ms -> 3 ms per scoring call at 5 ms), four times over for speculative rejection's rounds.
        max_wait_ms: float = 0.0,
        max_batch_tokens: int = 16384,
        observer: RerankObserver | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves memory and doubles tensor-core throughput on GPU; CPUs are fastest and exact in fp32.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.observer: RerankObserver = observer or NullObserver()
        self.runtime = Runtime(
            worker=ThreadPoolExecutor(1, thread_name_prefix="rerank-worker"),
            prep=ThreadPoolExecutor(1, thread_name_prefix="rerank-prep"),
            max_wait=max_wait_ms / 1000.0,
            max_batch_tokens=max_batch_tokens,
            observer=self.observer,
        )
        self._sources: dict[str, asyncio.Future[RewardSource]] = {}
        self._wanted: set[str] | None = None  # None until retain(): every source built stays
        self._background: set[asyncio.Task] = set()

    def retain(self, configs: Iterable[RewardConfig]) -> None:
        """Keep exactly these sources: start loading the missing ones, close the rest (in the background)."""
        wanted: dict[str, RewardConfig] = {}
        for config in configs:
            _collect(config, wanted)
        self._wanted = set(wanted)
        for key, config in wanted.items():
            if key not in self._sources:
                self._spawn(self._preload(config))
        for key in [key for key in self._sources if key not in wanted]:
            self._spawn(self._unload(key))

    def is_loaded(self, config: RewardConfig) -> bool:
        """Whether the source for `config` is built and warm (no request will wait for it)."""
        future = self._sources.get(config.model_dump_json())
        return future is not None and future.done() and not future.cancelled() and future.exception() is None

    async def settled(self) -> None:
        """Waits for the loads and unloads that `retain` started."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _preload(self, config: RewardConfig) -> None:
        started = time.perf_counter()
        try:
            await self.load(config)
        except Exception as exc:  # noqa: BLE001 - requests retry the load and follow the step's on_error
            log.warning("could not load the %s reward (requests will try again): %s", config.type, exc)
            return
        log.info("%s reward loaded and warmed in %.1f s", config.type, time.perf_counter() - started)

    async def _unload(self, key: str) -> None:
        future = self._sources.pop(key, None)
        if future is None:
            return
        try:
            source = await future
        except Exception:  # noqa: BLE001 - a load that failed holds nothing
            return
        # Requests already queued on it (an older policy version still finishing) are scored first.
        await source.close()
        log.info("%s reward unloaded: no loaded policy uses it", source.kind)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed weights back, so the GPU's memory use shows it

    async def load(self, config: RewardConfig) -> RewardSource:
        """The source for `config`, built once; concurrent callers share one build."""
        key = config.model_dump_json()
        future = self._sources.get(key)
        if future is None:
            future = asyncio.ensure_future(self._build(config))
            self._sources[key] = future
        try:
            # shield: a caller timing out must not cancel a load that others wait for.
            return await asyncio.shield(future)
        except Exception:
            if self._sources.get(key) is future and future.done():
                del self._sources[key]  # a failed load is retried by the next request
            raise

    async def _build(self, config: RewardConfig) -> RewardSource:
        if isinstance(config, WeightedReward):
            children = [await self.load(entry.source) for entry in config.sources]
            return WeightedSource([(entry.weight, child) for entry, child in zip(config.sources, children, strict=True)])
        if isinstance(config, RemoteReward):
            return RemoteSource(config, self.observer)
        from guard.rerank.sources import EmbeddingSource, LMJudgeSource, SequenceClassifierSource, TrainedHeadSource

        local = {
            SequenceClassifierReward: SequenceClassifierSource,
            LMJudgeReward: LMJudgeSource,
            EmbeddingReward: EmbeddingSource,
            TrainedReward: TrainedHeadSource,
        }[type(config)]
        build = partial(local, config, self.runtime, self.device, self.dtype)
        try:
            # Loading takes seconds: off the loop, and off the worker so scoring continues meanwhile.
            source = await asyncio.get_running_loop().run_in_executor(None, build)
            # Warm on the worker thread: the first request must not pay for kernels and allocations.
            await asyncio.get_running_loop().run_in_executor(self.runtime.worker, source.warm)
            return source
        except RerankError:
            raise
        except Exception as exc:
            raise RerankError(f"cannot load {config.type} reward: {exc!r}") from exc

    async def score(
        self, config: RewardConfig, prompt: Prompt, candidates: Sequence[str], *, timeout: float | None = None
    ) -> list[float]:
        """One score per candidate, higher is better. Raises RerankError (also on timeout)."""
        if not candidates:
            return []
        try:
            async with asyncio.timeout(timeout):
                source = await self.load(config)
                return await source.score(ScoreRequest(prompt, tuple(candidates)), timeout=None)
        except TimeoutError:
            raise RerankError(f"{config.type} reward: no score within {timeout:.3g}s") from None
        finally:
            # A request of a policy version reloaded away may have rebuilt a source nothing names now.
            key = config.model_dump_json()
            if self._wanted is not None and key not in self._wanted and key in self._sources:
                self._spawn(self._unload(key))

    def select(
        self,
        scores: Sequence[Sequence[float]],
        penalties: Sequence[Sequence[float]] | None = None,
        *,
        rule: Literal["argmax", "softmax"] = "argmax",
        tau: float = 1.0,
        normalize: Literal["none", "zscore"] = "none",
        seed: int | None = None,
    ) -> list[int]:
        """The chosen index for each request's (ragged) scores, after penalties and normalisation.

        `seed` makes softmax sampling reproducible (the request's sampling seed). Runs on the CPU, on
        the caller's thread: a request's few scores cost microseconds there, and a GPU round trip
        would block the event loop until queued forward passes finish.
        """
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        return selection.select(
            [list(row) for row in scores],
            [list(row) for row in penalties] if penalties is not None else None,
            rule=rule,
            tau=tau,
            normalize=normalize,
            generator=generator,
        )

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        sources = [future.result() for future in self._sources.values() if future.done() and not future.cancelled() and future.exception() is None]
        for future in self._sources.values():
            future.cancel()
        self._sources.clear()
        await asyncio.gather(*(source.close() for source in sources), return_exceptions=True)
        self.runtime.worker.shutdown(wait=False, cancel_futures=True)
        self.runtime.prep.shutdown(wait=False, cancel_futures=True)


def _collect(config: RewardConfig, into: dict[str, RewardConfig]) -> None:
    into[config.model_dump_json()] = config
    if isinstance(config, WeightedReward):
        for entry in config.sources:
            _collect(entry.source, into)
