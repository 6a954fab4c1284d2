"""Config models for the best_of_n step and its reward sources.

(Starter version: the rerank work owns this file and extends it.)
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingReward(_Strict):
    type: Literal["embedding"]
    model: str | None = Field(None, description="Sentence-embedding model directory; default: the bundled all-MiniLM-L6-v2.")


RewardConfig = Annotated[Union[EmbeddingReward], Field(discriminator="type")]


class BestOfNConfig(_Strict):
    n: int = Field(4, ge=1, le=64, description="Candidates sampled in one upstream call.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature for the candidates.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass for the candidates.")
    reward: RewardConfig = Field(..., description="Reward source that scores candidates.")
    selection: Literal["argmax", "softmax"] = Field("argmax", description="Pick the best, or sample from softmax(score / tau).")
    tau: float = Field(1.0, gt=0.0, description="Softmax temperature for selection=softmax.")
