"""The policy format: pydantic models, unknown keys rejected everywhere.

A policy is a name, the upstream model it routes to, default sampling and an
ordered list of steps. Each step has a `type` that names its entry in the
pipeline's step registry; the config models for each type live here so that
a policy file can be validated without importing the pipeline.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from guard.policy.reward import BestOfNConfig, EmbeddingReward
from guard.types import Sampling

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(Strict):
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Default completion length cap.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default nucleus sampling mass.")
    seed: int | None = Field(None, description="Default sampling seed.")
    stop: list[str] = Field(default_factory=list, description="Default stop strings.")

    def to_sampling(self) -> Sampling:
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class StepBase(Strict):
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Name shown in traces and metrics; defaults to the step type."
    )


class SystemPromptStep(StepBase):
    type: Literal["system_prompt"]
    content: str = Field(..., min_length=1, description="The operator's system instructions.")
    mode: Literal["prepend", "replace", "append"] = Field(
        "prepend",
        description="prepend: before any client system message; replace: drop client system messages; "
        "append: after the client's system message.",
    )


class ChainOfThoughtStep(StepBase):
    type: Literal["chain_of_thought"]
    instruction: str = Field(
        "Think step by step. Write your reasoning first, then write '{marker}' followed by the final answer only.",
        min_length=1,
        description="Instruction asking the model to reason first; '{marker}' is replaced by the marker.",
    )
    marker: str = Field("Final answer:", min_length=1, description="Separates the reasoning from the final answer.")
    on_missing_marker: Literal["return_all", "refuse"] = Field(
        "return_all", description="What to return when the model never wrote the marker."
    )


class PatternRule(Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Rule name, reported in refusals and metrics.")
    keywords: list[str] = Field(
        default_factory=list, description="Words or phrases matched case-insensitively on word boundaries."
    )
    regex: list[str] = Field(default_factory=list, description="Regular expressions, matched case-insensitively.")

    @field_validator("regex")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _not_empty(self) -> PatternRule:
        if not self.keywords and not self.regex:
            raise ValueError(f"rule {self.name!r} has neither keywords nor regex")
        return self

    def compiled(self) -> re.Pattern[str]:
        """One case-insensitive alternation: keywords on word boundaries, regexes as written."""
        # Any run of whitespace between a keyword's words still matches ("make  meth").
        words = [re.escape(keyword).replace(r"\ ", r"\s+") for keyword in self.keywords]
        # Not `\b`: next to a keyword's own punctuation ("c++", ".onion") `\b` would demand a
        # word character, so the keyword could never match on its own. No word character
        # may touch either end instead; for keywords that start and end in one, that is `\b`.
        alternatives = [rf"(?<!\w){escaped}(?!\w)" for escaped in words]
        alternatives += [f"(?:{pattern})" for pattern in self.regex]
        return re.compile("|".join(alternatives), re.IGNORECASE)


class SemanticRule(Strict):
    """Refuses text that is closer to harmful exemplars than to benign ones.

    Nearest-harmful similarity alone separates poorly (a benign "reset my own password" can sit
    closer to "break into someone's account" than a real attack does); benign exemplars give the
    contrast that makes a threshold meaningful.
    """

    name: str = Field(..., pattern=NAME_PATTERN, description="Rule name, reported in refusals and metrics.")
    harmful: list[str] = Field(..., min_length=1, description="Examples of requests (or answers) to refuse.")
    benign: list[str] = Field(default_factory=list, description="Nearby examples that must pass.")
    threshold: float = Field(0.6, ge=-1.0, le=1.0, description="Minimum cosine similarity to the nearest harmful example.")
    margin: float = Field(
        0.05, ge=0.0, le=2.0, description="How much closer the nearest harmful example must be than the nearest benign one."
    )
    model: EmbeddingReward = Field(
        default_factory=lambda: EmbeddingReward(type="embedding"),
        description="Sentence-embedding model; default: the bundled all-MiniLM-L6-v2.",
    )


class FilterStepBase(StepBase):
    rules: list[PatternRule] = Field(default_factory=list, description="Pattern rules; the first match refuses.")
    semantic: list[SemanticRule] = Field(
        default_factory=list, description="Similarity rules, checked after the pattern rules."
    )
    refusal: str | None = Field(None, description="Refusal text for this filter; defaults to the policy's.")
    on_error: Literal["refuse", "allow"] = Field(
        "refuse", description="Fail mode when the filter itself fails: refuse (fail closed) or allow (fail open)."
    )

    @model_validator(mode="after")
    def _has_rules(self) -> FilterStepBase:
        if not self.rules and not self.semantic:
            raise ValueError("a filter needs at least one entry in rules or semantic")
        return self


class InputFilterStep(FilterStepBase):
    type: Literal["input_filter"]
    roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["user"], description="Chat roles whose content is checked."
    )


class OutputFilterStep(FilterStepBase):
    type: Literal["output_filter"]


class BestOfNStep(StepBase, BestOfNConfig):
    type: Literal["best_of_n"]


StepConfig = Annotated[
    Union[SystemPromptStep, ChainOfThoughtStep, InputFilterStep, OutputFilterStep, BestOfNStep],
    Field(discriminator="type"),
]


class Policy(Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Policy name clients ask for.")
    description: str = Field("", description="What this policy is for.")
    model: str | None = Field(
        None, description="Upstream model name (a base model or a LoRA adapter vLLM serves); default: the server's."
    )
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults, description="Default sampling parameters.")
    refusal: str = Field(
        "I can't help with that request.", min_length=1, description="Default refusal text for filters."
    )
    steps: list[StepConfig] = Field(default_factory=list, description="Steps applied in order.")

    @model_validator(mode="after")
    def _step_names_unique(self) -> Policy:
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            name = step.name or step.type
            if name in seen:
                raise ValueError(f"steps[{index}]: duplicate step name {name!r}; give each step of this type a name")
            seen.add(name)
        if sum(1 for step in self.steps if step.type == "best_of_n") > 1:
            raise ValueError("at most one best_of_n step per policy")
        return self
