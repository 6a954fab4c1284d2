"""The step interface, the request context steps work on, and the step registry.

A request runs in three phases:
  1. `before(ctx)` of every step, in policy order: rewrite the request or refuse it
     (set `ctx.refusal`, and the upstream is never called);
  2. one upstream call producing `ctx.candidates` (n of them when a step asked for n), or the
     `generate(ctx)` of a step that generates itself (best_of_n with early pruning);
  3. `after(ctx, candidate)` of every step, in policy order, for each candidate
     (extract an answer, refuse a candidate), then `select(ctx)` of the step that
     selects (best_of_n); without one, the first candidate that was not refused wins.

When every step is `streamable`, phases 2 and 3 happen while the text streams instead:
one streamed upstream call, and the steps that `moderates_stream` check the text so far
with `check_partial` as it grows (and once more at the end); the runner holds back the
last `stream_holdback_chars` characters until a check has passed over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from guard.types import Completion, GenerateInput, Message, Refusal, Sampling

if TYPE_CHECKING:
    from guard.pipeline.retrieve import Retrieved
    from guard.policy.model import Policy
    from guard.rerank import Reranker
    from guard.retrieval.registry import Indexes
    from guard.safety.embedder import Embedders
    from guard.upstream.client import UpstreamClient


@dataclass
class Candidate:
    index: int
    text: str  # what the client would receive (after extraction steps)
    raw_text: str  # what the model produced
    finish_reason: str | None = None
    refusal: Refusal | None = None
    token_logprobs: tuple[float, ...] | None = None
    # Step-specific facts about this candidate (reasoning, scores, ...), kept for the trace.
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    request: GenerateInput
    policy: Policy
    policy_version: str
    model: str
    sampling: Sampling
    # Working copies the before-hooks rewrite; exactly one is not None.
    prompt: str | None = None
    messages: list[Message] | None = None
    # Absolute deadline in time.monotonic() seconds, from the client's gRPC deadline.
    deadline: float | None = None
    refusal: Refusal | None = None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    # Detail the running step wants in the trace; the runner collects and resets it.
    detail: dict[str, Any] = field(default_factory=dict)
    # What the retrieve step put into the prompt: the answer's sources, and what grounding_check reads.
    retrieved: Retrieved | None = None

    def remaining(self) -> float | None:
        """Seconds left until the deadline (0.0 once it has passed), or None without one."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def user_text(self, roles: tuple[str, ...] = ("user",)) -> str:
        if self.messages is not None:
            return "\n".join(m.content for m in self.messages if m.role in roles)
        return self.prompt or ""


@dataclass
class StepDeps:
    """What steps may use; injected so steps never reach for globals or the server."""

    upstream: UpstreamClient
    reranker: Reranker | None = None
    embedders: Embedders | None = None
    indexes: Indexes | None = None
    # The model requests go to when a policy names none.
    default_model: str = ""
    # Clients for rules that name a server of their own (guard models), by base URL.
    other_upstreams: dict[str, UpstreamClient] = field(default_factory=dict)

    def upstream_at(self, url: str | None) -> UpstreamClient:
        """guard's upstream for None; otherwise one shared client per URL (closed with the app)."""
        if url is None:
            return self.upstream
        client = self.other_upstreams.get(url)
        if client is None:
            from guard.upstream.client import UpstreamClient

            client = self.other_upstreams[url] = UpstreamClient([url], observer=self.upstream.observer)
        return client


ConfigT = TypeVar("ConfigT")


class Step(Generic[ConfigT]):
    """Base class: override the hooks you need. Instances are built once per policy version."""

    type: ClassVar[str]
    # False when the step needs the whole answer, so a stream must be buffered.
    streamable: ClassVar[bool] = True
    # True for the step whose select() picks the answer among candidates.
    selects: ClassVar[bool] = False
    # True when check_partial() can vet a growing answer, so a stream need not be buffered for
    # this step (it must also be streamable). Its config then has stream_holdback_chars and
    # stream_check_every_chars.
    moderates_stream: ClassVar[bool] = False

    def __init__(self, config: ConfigT, deps: StepDeps) -> None:
        self.config = config
        self.deps = deps
        self.name: str = getattr(config, "name", None) or self.type

    async def before(self, ctx: Context) -> None:
        """Rewrite ctx.prompt / ctx.messages / ctx.sampling, or set ctx.refusal."""

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        """Post-process one candidate: change candidate.text or set candidate.refusal."""

    async def select(self, ctx: Context) -> Candidate | None:
        """Pick the answer among ctx.candidates (only for steps with selects=True)."""
        raise NotImplementedError

    async def check_partial(self, ctx: Context, text: str, *, final: bool, checked: int = 0) -> Refusal | None:
        """Vet the answer while it streams (only for steps with moderates_stream=True).

        `text` is the whole text generated so far, of which the first `checked` characters were
        vetted by the previous call (one chunk may bring any amount of new text: all of it must be
        read); `final` is True for the last call, on the whole answer. A Refusal stops the stream
        and closes the upstream request.
        """
        return None

    # True when generate() replaces the runner's single upstream call (set per instance).
    generates: bool = False

    async def generate(self, ctx: Context) -> Completion:
        """Produce the candidates instead of the runner's one upstream call (only when generates is True)."""
        raise NotImplementedError

    @property
    def has_before(self) -> bool:
        return type(self).before is not Step.before

    @property
    def has_after(self) -> bool:
        return type(self).after is not Step.after


_REGISTRY: dict[str, type[Step]] = {}


def register_step(type_name: str):
    """Class decorator: makes a Step available under its YAML `type`."""

    def decorate(cls: type[Step]) -> type[Step]:
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise ValueError(f"step type {type_name!r} registered twice")
        cls.type = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def step_class(type_name: str) -> type[Step]:
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown step type {type_name!r} (known: {known})") from None


def registered_step_types() -> list[str]:
    return sorted(_REGISTRY)
