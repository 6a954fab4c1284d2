"""Plain data types shared by every layer (no protobuf, no HTTP).

The server converts protobuf to these; the pipeline, upstream and rerank
layers only ever see these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None means "not set" (the policy default or vLLM's applies)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None

    def merged_over(self, defaults: Sampling) -> Sampling:
        """Fields set here win over `defaults`."""
        return Sampling(
            max_tokens=self.max_tokens if self.max_tokens is not None else defaults.max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            seed=self.seed if self.seed is not None else defaults.seed,
            stop=self.stop or defaults.stop,
            n=self.n if self.n != 1 else defaults.n,
            logprobs=self.logprobs if self.logprobs is not None else defaults.logprobs,
        )

    def with_(self, **changes: Any) -> Sampling:
        return replace(self, **changes)


@dataclass
class GenerateInput:
    """What a client asked for. Exactly one of prompt / messages is set."""

    prompt: str | None = None
    messages: list[Message] | None = None
    policy: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    metadata: dict[str, str] = field(default_factory=dict)
    include_trace: bool = False
    # The caller's x-request-id or one guard made; sent to vLLM (its X-Request-Id) and in the answer.
    request_id: str = ""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None = None
    # Per-token log-probabilities of the sampled tokens, when asked for.
    token_logprobs: tuple[float, ...] | None = None
    # Per position, the most likely alternatives {token text: logprob} (the sampled token included),
    # when asked for (Sampling.logprobs = K alternatives).
    top_logprobs: tuple[dict[str, float], ...] | None = None


@dataclass(frozen=True)
class Completion:
    """One upstream response: n choices sharing one prompt."""

    choices: tuple[Choice, ...]
    prompt_tokens: int
    completion_tokens: int
    model: str
    upstream_url: str = ""


@dataclass(frozen=True)
class StreamDelta:
    """One streamed chunk. `finish_reason` arrives on the last chunks; token counts (so far) and the
    answering upstream on usage chunks."""

    index: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    upstream_url: str | None = None


@dataclass(frozen=True)
class Refusal:
    stage: Literal["input", "output"]
    step: str  # name of the step that refused
    rule: str  # rule that matched, or "" when not rule-based
    reason: str  # for operators (trace, logs)
    text: str  # what the client receives instead of an answer


@dataclass
class TraceEntry:
    step: str
    type: str
    phase: Literal["before", "generate", "after", "select"]
    duration_seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class CandidateAnswer:
    """One candidate a selecting step (best_of_n) chose among, as generated: for the audit log, where
    preference pairs are rebuilt from what guard generated (never from text a client sends back)."""

    index: int
    text: str  # after the other steps' after-hooks (what the client would have received)
    score: float | None = None  # the reward score; None when not scored (refused, or the reward failed)
    refused_by: str = ""  # the step that refused it; "" when it was not refused


@dataclass(frozen=True)
class Source:
    """A retrieved chunk the model was given as numbered source `number` (the retrieve step)."""

    number: int
    id: str  # the chunk: "<document>#<ordinal>"
    document: str  # its file, relative to the indexed directory
    heading: str
    text: str
    score: float  # cosine similarity to the user's last turn
    cited: bool = False  # the answer cites it as [number]


@dataclass
class GenerateResult:
    text: str
    finish_reason: str
    policy: str
    policy_version: str
    refusal: Refusal | None = None
    usage: Usage = field(default_factory=Usage)
    trace: list[TraceEntry] = field(default_factory=list)
    upstream_seconds: float = 0.0
    total_seconds: float = 0.0
    upstream_url: str = ""
    upstream_model: str = ""
    # Every candidate of a selecting step (best_of_n), refused ones included; () without one. The audit
    # log's, not the client's: a refused candidate's text must never reach the client.
    candidates: tuple[CandidateAnswer, ...] = ()
    # The sources a retrieve step put into the prompt (none when the answer is a refusal).
    sources: tuple[Source, ...] = ()
