"""The reward-source interface and the types shared by the rerank package."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from guard.types import Message

Prompt = str | Sequence[Message]  # a raw prompt, or a conversation


class RerankError(Exception):
    """A reward source could not score a request (bad model dir, input too long, remote failure)."""


@dataclass(frozen=True)
class ScoreRequest:
    """One request's candidates, scored against its prompt (a raw prompt or a conversation)."""

    prompt: Prompt
    candidates: tuple[str, ...]


class RewardSource(ABC):
    """Scores one request's candidates. Implementations pool concurrent requests themselves."""

    #: Metric label, e.g. "sequence_classifier".
    kind: str

    @abstractmethod
    async def score(self, request: ScoreRequest, *, timeout: float | None = None) -> list[float]:
        """One score per candidate, higher is better. Raises RerankError."""

    def warm(self) -> None:  # noqa: B027 - optional hook
        """Runs once after loading, on the scoring thread, before the source takes requests."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads and models."""


class RerankObserver(Protocol):
    """Where the Reranker reports what metrics need; guard.metrics wires one up."""

    def scored(self, source: str, candidates: int, seconds: float) -> None:
        """One request's candidates were scored (queueing included)."""

    def batch(self, source: str, sequences: int) -> None:
        """One model forward pass ran over `sequences` sequences (called from the worker thread)."""

    def chosen(self, policy: str, score: float) -> None:
        """best_of_n returned a candidate with this reward score."""


class NullObserver:
    def scored(self, source: str, candidates: int, seconds: float) -> None:
        pass

    def batch(self, source: str, sequences: int) -> None:
        pass

    def chosen(self, policy: str, score: float) -> None:
        pass


def user_text(prompt: Prompt) -> str:
    """The text a reply should be relevant to: the raw prompt, or the last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((m.content for m in reversed(prompt) if m.role == "user"), "")


def plain_transcript(prompt: Prompt) -> str:
    """A conversation as plain text, for models without a chat template."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)
