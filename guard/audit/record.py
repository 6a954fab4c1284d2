"""The audit record: what guard did with one request, as stored, queried and exported.

The request path hands over a `Finished` (references to what it already holds: the request's id
and, when the policy keeps text, its prompt; its results; how it ended) and the store's writer turns
it into an `AuditRecord` with `record_of`, off the request path: reading the trace, hashing text and
serialising cost the request nothing.

Prompt and answer text follow the policy's `audit.text`: `none` keeps neither, `hashed` keeps
`text_hash` of each, `full` keeps them. Chain-of-thought reasoning in the trace is model text too
and follows the same setting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from guard.types import CandidateAnswer, GenerateInput, GenerateResult, Message, TraceEntry

TextMode = Literal["none", "hashed", "full"]
Outcome = Literal["ok", "refused", "error"]

# Trace detail keys that hold model text (chain_of_thought's hidden reasoning, in the answer's notes;
# grounding_check's unsupported sentences).
TEXT_DETAIL_KEYS = frozenset({"reasoning", "unsupported_text"})
# The trace detail key whose entries carry candidates' texts (best_of_n); a record keeps those texts in
# ChoiceRecord.candidates instead, following its text mode.
CANDIDATES_DETAIL_KEY = "candidates"


@dataclass(slots=True)  # not frozen: that __init__ costs 2 µs instead of 0.75 µs; nothing changes one anyway
class Finished:
    """A request as it ended, from the request path: no copying, no serialising.

    `policy` is empty when the request failed before a policy was chosen (unknown policy,
    permission denied); `text` is then "none": no policy asked for more. `input` is the client's
    prompt or messages when `text` keeps them, else None: a queued record holds no prompt it will
    not store (a prompt can be megabytes).
    """

    rpc: str
    tenant: str
    time: float  # unix seconds when the request arrived
    seconds: float
    outcome: Outcome
    status: str  # "OK", or the gRPC status code name of a failure (CANCELLED, DEADLINE_EXCEEDED, ...)
    error: str
    request_id: str
    input: str | list[Message] | None = None
    policy: str = ""
    policy_version: str = ""
    model: str = ""
    text: TextMode = "none"
    results: tuple[GenerateResult, ...] = ()


@dataclass(frozen=True)
class StepDecision:
    """One step's hook as the trace recorded it: what it decided (matched rule, scores, chosen candidate...)."""

    step: str
    type: str
    phase: str
    seconds: float
    detail: dict[str, Any]


@dataclass(frozen=True)
class RefusalRecord:
    stage: str
    step: str
    rule: str
    reason: str


@dataclass(frozen=True)
class CandidateRecord:
    """One best_of_n candidate: every one is recorded, refused ones included (the audit log is the operator's)."""

    index: int
    text: str | None  # as ChoiceRecord.output: the text, its hash, or None
    score: float | None  # its reward score; None when not scored (refused, or the reward failed)
    refused_by: str  # the step that refused it; "" when it was not refused


@dataclass(frozen=True)
class ChoiceRecord:
    """One answer (an OpenAI request with n > 1 has several, each the whole policy)."""

    finish_reason: str
    refusal: RefusalRecord | None
    steps: tuple[StepDecision, ...]
    output: str | None  # the answer (or refusal) text, its hash, or None (see AuditRecord.text)
    upstream_seconds: float
    prompt_tokens: int
    completion_tokens: int
    # The candidates best_of_n chose among, by index; () for a policy without one (and in older records).
    candidates: tuple[CandidateRecord, ...] = ()


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    time: float  # unix seconds when the request arrived
    rpc: str  # gRPC method or HTTP route (chat.completions, completions)
    tenant: str  # the API key's tenant; "anonymous" without a key file
    policy: str  # "" when none was chosen (the request failed before)
    policy_version: str
    model: str  # the upstream model the policy routes to
    outcome: Outcome
    status: str
    error: str  # guard's message for a failed request (the one its caller got)
    seconds: float  # inside guard, receipt to last byte
    text: TextMode  # what `input` and each choice's `output` hold
    input: Any  # the prompt (str) or messages ([{role, content}]), its text_hash, or None
    choices: tuple[ChoiceRecord, ...] = field(default_factory=tuple)

    @property
    def refusal(self) -> RefusalRecord | None:
        """The first refused choice's refusal (the request is refused if any choice was)."""
        return next((c.refusal for c in self.choices if c.refusal is not None), None)

    @property
    def fail_opens(self) -> int:
        """Filter checks that failed and let the request pass (on_error: allow)."""
        return sum(1 for c in self.choices for s in c.steps if s.detail.get("fail_open"))

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def to_json(self) -> bytes:
        # repr() for anything a step put in its detail that JSON cannot hold.
        return orjson.dumps(self, default=repr, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, data: bytes | str) -> AuditRecord:
        return cls.from_dict(orjson.loads(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        choices = tuple(
            ChoiceRecord(
                **{
                    **choice,
                    "refusal": RefusalRecord(**choice["refusal"]) if choice["refusal"] else None,
                    "steps": tuple(StepDecision(**step) for step in choice["steps"]),
                    "candidates": tuple(CandidateRecord(**candidate) for candidate in choice.get("candidates", ())),
                }
            )
            for choice in data["choices"]
        )
        return cls(**{**data, "choices": choices})


def input_to_keep(request: GenerateInput, text: TextMode) -> str | list[Message] | None:
    """What a Finished holds of the request's text: a reference to it, if the policy keeps text at all."""
    if text == "none":
        return None
    return request.messages if request.messages is not None else request.prompt or ""


def text_hash(value: str | list[dict[str, str]]) -> str:
    """SHA-256 (hex) of a text, or of a conversation as compact JSON ([{"role": ..., "content": ...}]).

    Plain, not salted or keyed: anyone holding a text can check whether it was sent, and identical
    prompts hash alike (counting, deduplicating preference data). The price: a short or guessable
    text can be found by hashing candidates, so `hashed` is not anonymity; `none` keeps nothing.
    """
    data = value.encode() if isinstance(value, str) else orjson.dumps(value)
    return hashlib.sha256(data).hexdigest()


def _kept(value: Any, mode: TextMode) -> Any:
    if value is None or mode == "none":
        return None
    return value if mode == "full" else text_hash(value)


def _input_of(value: str | list[Message] | None) -> str | list[dict[str, str]] | None:
    if value is None or isinstance(value, str):
        return value
    return [{"role": m.role, "content": m.content} for m in value]


def _decision(entry: TraceEntry, mode: TextMode) -> StepDecision:
    detail = entry.detail
    if not TEXT_DETAIL_KEYS.isdisjoint(detail):
        detail = {key: _kept(value, mode) if key in TEXT_DETAIL_KEYS else value for key, value in detail.items()}
    candidates = detail.get(CANDIDATES_DETAIL_KEY)
    if isinstance(candidates, list) and any(isinstance(c, dict) and "text" in c for c in candidates):
        # The trace shows clients the texts of candidates that were not refused; the record keeps every
        # candidate's text once, in ChoiceRecord.candidates, as its text mode says.
        stripped = [{k: v for k, v in c.items() if k != "text"} if isinstance(c, dict) else c for c in candidates]
        detail = {**detail, CANDIDATES_DETAIL_KEY: stripped}
    return StepDecision(entry.step, entry.type, entry.phase, entry.duration_seconds, detail)


def _candidate(candidate: CandidateAnswer, mode: TextMode) -> CandidateRecord:
    return CandidateRecord(candidate.index, _kept(candidate.text, mode), candidate.score, candidate.refused_by)


def _choice(result: GenerateResult, mode: TextMode) -> ChoiceRecord:
    refusal = result.refusal
    return ChoiceRecord(
        finish_reason=result.finish_reason,
        refusal=RefusalRecord(refusal.stage, refusal.step, refusal.rule, refusal.reason) if refusal is not None else None,
        steps=tuple(_decision(entry, mode) for entry in result.trace),
        output=_kept(result.text, mode),
        upstream_seconds=result.upstream_seconds,
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=result.usage.completion_tokens,
        candidates=tuple(_candidate(candidate, mode) for candidate in result.candidates),
    )


def record_of(finished: Finished) -> AuditRecord:
    mode = finished.text
    return AuditRecord(
        request_id=finished.request_id,
        time=finished.time,
        rpc=finished.rpc,
        tenant=finished.tenant,
        policy=finished.policy,
        policy_version=finished.policy_version,
        model=finished.model,
        outcome=finished.outcome,
        status=finished.status,
        error=finished.error,
        seconds=finished.seconds,
        text=mode,
        input=_kept(_input_of(finished.input), mode),
        choices=tuple(_choice(result, mode) for result in finished.results),
    )
