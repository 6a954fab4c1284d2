"""A reward model served by another vLLM server (pooling runner): its /score or /pooling API.

No local batching: the remote engine batches requests itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from guard.concurrency import gather_or_cancel
from guard.policy.reward import RemoteReward
from guard.rerank.base import RerankError, RerankObserver, RewardSource, ScoreRequest, user_text


def _last_number(value: Any) -> float:
    """The last pooled value: a one-label score, the last class's probability, or the last token's reward."""
    while isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


class RemoteSource(RewardSource):
    kind = "remote"

    def __init__(self, config: RemoteReward, observer: RerankObserver) -> None:
        self.config = config
        self.observer = observer
        self._client = httpx.AsyncClient(base_url=config.url.rstrip("/"))

    async def score(self, request: ScoreRequest, *, timeout: float | None = None) -> list[float]:
        limit = self.config.timeout_seconds if timeout is None else min(timeout, self.config.timeout_seconds)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                if self.config.api == "score":
                    scores = await self._score_api(request)
                else:
                    scores = await gather_or_cancel(*(self._pooling(request, reply) for reply in request.candidates))
        except TimeoutError:
            raise RerankError(f"remote reward {self.config.url}: no answer within {limit:.3g}s") from None
        except httpx.HTTPError as exc:
            raise RerankError(f"remote reward {self.config.url}: {exc!r}") from exc
        self.observer.scored(self.kind, len(request.candidates), time.perf_counter() - started)
        return scores

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = await self._client.post(path, json=body)
        if response.status_code != 200:
            raise RerankError(f"remote reward {self.config.url}{path}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise RerankError(f"remote reward {self.config.url}{path}: response is not JSON") from None

    async def _score_api(self, request: ScoreRequest) -> list[float]:
        body = {"model": self.config.model, "text_1": user_text(request.prompt), "text_2": list(request.candidates)}
        payload = await self._post("/score", body)
        try:
            rows = sorted(payload["data"], key=lambda row: row["index"])
            scores = [float(row["score"]) for row in rows]
            indices = [row["index"] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise RerankError(f"remote reward {self.config.url}/score: malformed response ({exc!r})") from None
        if indices != list(range(len(request.candidates))):
            raise RerankError(
                f"remote reward {self.config.url}/score: {len(scores)} scores for {len(request.candidates)} candidates"
            )
        return scores

    async def _pooling(self, request: ScoreRequest, reply: str) -> float:
        body: dict[str, Any] = {"model": self.config.model}
        if isinstance(request.prompt, str):
            body["input"] = request.prompt + reply
        else:
            # The server applies the model's chat template, as the reward model was trained.
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.prompt]
            body["messages"].append({"role": "assistant", "content": reply})
        payload = await self._post("/pooling", body)
        try:
            return _last_number(payload["data"][0]["data"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RerankError(f"remote reward {self.config.url}/pooling: malformed response ({exc!r})") from None

    async def close(self) -> None:
        await self._client.aclose()
