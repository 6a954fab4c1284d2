"""Reranking for best_of_n: reward sources, cross-request batching, shared-prefix scoring, selection."""

from guard.rerank.base import RerankError, RerankObserver, RewardSource, ScoreRequest
from guard.rerank.service import Reranker

__all__ = ["Reranker", "RerankError", "RerankObserver", "RewardSource", "ScoreRequest"]
