"""The policy format: pydantic models, unknown keys rejected everywhere.

A policy is a name, the upstream model it routes to, default sampling and an
ordered list of steps. Each step has a `type` that names its entry in the
pipeline's step registry; the config models for each type live here so that
a policy file can be validated without importing the pipeline.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from guard import limits
from guard.policy.guard_model import GuardModelRule
from guard.policy.retrieval import GroundingCheckConfig, RetrieveConfig
from guard.policy.reward import BestOfNConfig, EmbeddingReward
from guard.safety.classifier import load_artefact
from guard.safety.patterns import compile_rule
from guard.types import Sampling

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(Strict):
    max_tokens: int | None = Field(None, ge=1, le=limits.MAX_TOKENS, description="Default completion length cap.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default nucleus sampling mass.")
    seed: int | None = Field(None, description="Default sampling seed.")
    stop: list[str] = Field(default_factory=list, max_length=limits.MAX_STOP_STRINGS, description="Default stop strings.")

    def to_sampling(self) -> Sampling:
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class SamplingLimits(Strict):
    """Ceilings the client cannot raise (defaults in `sampling` are only defaults)."""

    max_tokens: int | None = Field(
        None, ge=1, le=limits.MAX_TOKENS, description="Most tokens one answer may take: larger client values, and an unset one, become this."
    )
    max_temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Highest sampling temperature: larger client values (and vLLM's default 1.0) become this."
    )
    pin_stop: bool = Field(
        False, description="The policy's `sampling.stop` strings always apply; a client's stop strings are added to them."
    )
    max_n: int = Field(
        1, ge=1, le=16, description="Most choices (`n`) one OpenAI-door request may ask for; each choice runs the whole policy."
    )

    def apply(self, sampling: Sampling, pinned_stop: tuple[str, ...]) -> Sampling:
        """`sampling` (client values over the policy's defaults) held within these limits."""
        changes: dict = {}
        if self.max_tokens is not None:
            changes["max_tokens"] = min(sampling.max_tokens or self.max_tokens, self.max_tokens)
        if self.max_temperature is not None:
            temperature = sampling.temperature if sampling.temperature is not None else VLLM_DEFAULT_TEMPERATURE
            changes["temperature"] = min(temperature, self.max_temperature)
        if self.pin_stop:
            changes["stop"] = tuple(dict.fromkeys(pinned_stop + sampling.stop))
        return sampling.with_(**changes) if changes else sampling


VLLM_DEFAULT_TEMPERATURE = 1.0


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
    regex: list[str] = Field(
        default_factory=list,
        description="Regular expressions (Python `regex` syntax), matched case-insensitively against the normalised text.",
    )

    @field_validator("regex")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compile_rule((), (pattern,))
            except Exception as exc:  # noqa: BLE001 - regex.error and friends
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _compiles(self) -> PatternRule:
        if not self.keywords and not self.regex:
            raise ValueError(f"rule {self.name!r} has neither keywords nor regex")
        # Each regex compiled alone is not enough: compile exactly what runs, the rule's joined alternation.
        try:
            compile_rule(self.keywords, self.regex)
        except Exception as exc:  # noqa: BLE001 - regex.error and friends
            raise ValueError(f"rule {self.name!r}: its patterns do not compile together: {exc}") from exc
        return self

    def compiled(self):
        """The exact pattern the filter steps search each normalised view with."""
        return compile_rule(self.keywords, self.regex)


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


class ClassifierRule(Strict):
    """A trained classifier over sentence embeddings (see `guard filter train`)."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Rule name, reported in refusals and metrics.")
    artefact: str | None = Field(
        None, description="Path of a classifier artefact (JSON) written by `guard filter train`; default: the shipped one."
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Refuse at this P(harmful) or above; default: the artefact's validated threshold."
    )
    max_windows: int = Field(
        512,
        ge=1,
        le=8192,
        description="Most encoder windows (sentences, and 32-word windows overlapping by half) one request may need; "
        "beyond that the filter's on_error applies.",
    )

    @model_validator(mode="after")
    def _artefact_loads(self) -> ClassifierRule:
        load_artefact(self.artefact)  # raises ValueError naming the file
        return self


class FilterStepBase(StepBase):
    rules: list[PatternRule] = Field(default_factory=list, description="Pattern rules; the first match refuses.")
    semantic: list[SemanticRule] = Field(
        default_factory=list, description="Similarity rules, checked after the pattern rules."
    )
    classifiers: list[ClassifierRule] = Field(
        default_factory=list, description="Trained classifier rules, checked after the similarity rules."
    )
    guard_models: list[GuardModelRule] = Field(
        default_factory=list, description="Safety models served by vLLM (Llama Guard, ShieldGemma, ...), checked last."
    )
    refusal: str | None = Field(None, description="Refusal text for this filter; defaults to the policy's.")
    on_error: Literal["refuse", "allow"] = Field(
        "refuse", description="Fail mode when the filter itself fails: refuse (fail closed) or allow (fail open)."
    )
    max_chars: int = Field(
        1_000_000, ge=1, description="Longest text the filter checks; longer input is a filter error (see on_error)."
    )
    pattern_budget_seconds: float = Field(
        0.5, gt=0.0, le=60.0, description="Time budget of one pattern rule on one text; overrun is a filter error."
    )

    @model_validator(mode="after")
    def _has_rules(self) -> FilterStepBase:
        if not (self.rules or self.semantic or self.classifiers or self.guard_models):
            raise ValueError("a filter needs at least one entry in rules, semantic, classifiers or guard_models")
        return self


class InputFilterStep(FilterStepBase):
    type: Literal["input_filter"]
    roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["system", "user", "assistant"],
        description="Client chat roles whose content is checked (all by default: a client system message or an "
        "assistant prefill is client text too). Text a policy step adds is never checked.",
    )


class OutputFilterStep(FilterStepBase):
    type: Literal["output_filter"]
    stream_holdback_chars: int = Field(
        128,
        ge=0,
        description="While streaming, the newest characters withheld from the client until a check has seen them "
        "followed by this many more. Must be at least the longest span a rule can match, so that no part of a "
        "match is released before the match is seen.",
    )
    stream_check_every_chars: int = Field(
        32, ge=1, description="While streaming, check the answer again after this many new characters."
    )


class BestOfNStep(StepBase, BestOfNConfig):
    type: Literal["best_of_n"]


class RetrieveStep(StepBase, RetrieveConfig):
    type: Literal["retrieve"]


class GroundingCheckStep(StepBase, GroundingCheckConfig):
    type: Literal["grounding_check"]


StepConfig = Annotated[
    Union[
        SystemPromptStep, ChainOfThoughtStep, InputFilterStep, OutputFilterStep, BestOfNStep, RetrieveStep, GroundingCheckStep
    ],
    Field(discriminator="type"),
]


class AuditOptions(Strict):
    text: Literal["none", "hashed", "full"] = Field(
        "none",
        description="What the audit log keeps of prompts and answers: none; hashed (SHA-256 of each, to match and "
        "count identical texts without keeping them; short texts can be guessed by hashing candidates); full (the text).",
    )


# vLLM takes any string as an adapter's name; guard passes it to vLLM's command line as `name=path`, so no "=".
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class AdapterRef(Strict):
    """A LoRA adapter vLLM serves on its base model: requests under the policy ask vLLM for it by name."""

    name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, description="The adapter's model name in vLLM (its /v1/models id).")
    path: str | None = Field(
        None,
        min_length=1,
        description="A PEFT adapter directory (adapter_config.json and weights), relative to this policy file's "
        "directory: guard has vLLM serve it as `name` (the managed vLLM from its start, a running vLLM through its "
        "runtime adapter loading). Without a path, vLLM must already serve `name`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        # `adapter: support-v2` is short for `adapter: {name: support-v2}`.
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, (dict, AdapterRef)):
            raise ValueError("expected an adapter name, or a mapping with name and path")
        return value


def _adapter_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema says what `_name_alone` accepts: a bare name, too."""
    schema["anyOf"].insert(0, {"type": "string", "pattern": ADAPTER_NAME_PATTERN})


class Policy(Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Policy name clients ask for.")
    description: str = Field("", description="What this policy is for.")
    model: str | None = Field(
        None, description="Upstream model name (a base model vLLM serves); default: the server's. For a LoRA adapter use `adapter`."
    )
    adapter: AdapterRef | None = Field(
        None,
        description="A LoRA adapter vLLM serves, asked for instead of the base model: its name, or {name, path}. "
        "Checked against vLLM's /v1/models when the policy loads: an adapter vLLM does not serve rejects the policy.",
        json_schema_extra=_adapter_schema,
    )
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults, description="Default sampling parameters.")
    limits: SamplingLimits = Field(
        default_factory=SamplingLimits, description="Sampling ceilings clients cannot raise (max_tokens, temperature, stop, n)."
    )
    refusal: str = Field(
        "I can't help with that request.", min_length=1, description="Default refusal text for filters."
    )
    steps: list[StepConfig] = Field(default_factory=list, description="Steps applied in order.")
    audit: AuditOptions = Field(
        default_factory=AuditOptions, description="What guard's audit log (`guard serve --audit-db`) keeps of this policy's requests."
    )

    @field_validator("adapter")
    @classmethod
    def _not_with_model(cls, adapter: AdapterRef | None, info: ValidationInfo) -> AdapterRef | None:
        if adapter is not None and info.data.get("model") is not None:
            raise ValueError("set model or adapter, not both: vLLM is asked for the adapter by its name, on the base model it serves")
        return adapter

    def upstream_model(self, default: str) -> str:
        """The model name requests under this policy ask vLLM for."""
        return self.adapter.name if self.adapter is not None else self.model or default

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
        retrieves = [index for index, step in enumerate(self.steps) if step.type == "retrieve"]
        if len(retrieves) > 1:
            raise ValueError("at most one retrieve step per policy")
        for index, step in enumerate(self.steps):
            if step.type == "grounding_check" and not (retrieves and retrieves[0] < index):
                raise ValueError(f"steps[{index}]: grounding_check checks answers against retrieved chunks: put a retrieve step before it")
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Policy:
        limits, defaults = self.limits, self.sampling
        if limits.max_tokens is not None and defaults.max_tokens is not None and defaults.max_tokens > limits.max_tokens:
            raise ValueError(f"sampling.max_tokens ({defaults.max_tokens}) is above limits.max_tokens ({limits.max_tokens})")
        if (
            limits.max_temperature is not None
            and defaults.temperature is not None
            and defaults.temperature > limits.max_temperature
        ):
            raise ValueError(
                f"sampling.temperature ({defaults.temperature}) is above limits.max_temperature ({limits.max_temperature})"
            )
        if limits.pin_stop and not defaults.stop:
            raise ValueError("limits.pin_stop needs stop strings in sampling.stop")
        return self
