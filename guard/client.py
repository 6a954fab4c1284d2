"""A small typed Python client for guard's gRPC API.

    from guard.client import GuardClient
    with GuardClient("127.0.0.1:50051") as guard:
        answer = guard.generate("What is the capital of France?", policy="safe-assistant")
        print(answer.text)

A labelling UI (or a simulated user) asks a best_of_n policy with trace=True, shows `answer.candidates`
(index and text of every candidate that was not refused) and sends what the user preferred:

        answer = guard.generate(prompt, policy="best-of-n", trace=True)
        guard.feedback(answer.request_id, preferred_index=answer.candidates[1].index)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc

ChatInput = Sequence[tuple[str, str]] | Sequence[dict[str, str]]


@dataclass(frozen=True)
class Candidate:
    """One best_of_n candidate, as the trace shows it."""

    index: int  # what Feedback's preferred_index names
    text: str | None  # None when it was refused: guard never shows a refused candidate's text
    score: float | None  # its reward score (None when not scored: refused, or the reward failed)
    refused: bool
    chosen: bool  # the answer


@dataclass(frozen=True)
class Source:
    """A document chunk the answer was given as source `number` (a retrieve step); `cited`: the answer cites [number]."""

    number: int
    id: str
    document: str
    heading: str
    text: str
    score: float
    cited: bool


@dataclass
class Answer:
    text: str
    finish_reason: str
    policy: str
    policy_version: str
    refused: bool = False
    refusal: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trace: dict[str, Any] | None = None
    request_id: str = ""  # what feedback names (the x-request-id sent, or the id guard made)
    sources: list[Source] = field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        """best_of_n's candidates from the trace (generate with trace=True); [] without a trace or best_of_n."""
        for step in (self.trace or {}).get("steps", []):
            if step.get("type") != "best_of_n" or step.get("phase") != "select":
                continue
            detail = step.get("detail", {})
            chosen = detail.get("chosen")
            return [
                Candidate(
                    index=int(entry["index"]),
                    text=entry.get("text"),
                    score=entry.get("score"),
                    refused="refused_by" in entry,
                    chosen=chosen is not None and int(entry["index"]) == int(chosen),
                )
                for entry in detail.get("candidates", [])
            ]
        return []


@dataclass(frozen=True)
class FeedbackReceipt:
    """Feedback guard stored: on the request with this id, which this policy (version) answered."""

    request_id: str
    policy: str
    policy_version: str


@dataclass
class PolicySummary:
    name: str
    version: str
    description: str
    model: str
    steps: list[str]


def open_channel(
    target: str,
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> grpc.Channel:
    """A plaintext channel, or TLS when a CA is given (with a client certificate: mTLS)."""
    if tls_ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.secure_channel(target, credentials)


def _request(
    prompt: str | ChatInput,
    policy: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str],
    metadata: dict[str, str] | None,
    trace: bool,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(policy=policy, include_trace=trace, metadata=metadata or {})
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        for item in prompt:
            role, content = (item["role"], item["content"]) if isinstance(item, dict) else item
            request.messages.messages.add(role=role, content=content)
        # An empty conversation must still select the messages branch so the server names the field.
        request.messages.SetInParent()
    sampling = request.sampling
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    sampling.stop.extend(stop)
    return request


def _answer(text: str, message: pb.GenerateResponse | pb.GenerateStreamResponse, with_trace: bool) -> Answer:
    return Answer(
        text=text,
        finish_reason=message.finish_reason,
        policy=message.policy,
        policy_version=message.policy_version,
        refused=message.refusal.refused,
        refusal=MessageToDict(message.refusal) if message.refusal.refused else {},
        prompt_tokens=message.usage.prompt_tokens,
        completion_tokens=message.usage.completion_tokens,
        trace=MessageToDict(message.trace, always_print_fields_with_no_presence=True) if with_trace else None,
        request_id=message.request_id,
        sources=[Source(s.number, s.id, s.document, s.heading, s.text, s.score, s.cited) for s in message.sources],
    )


class GuardClient:
    """Blocking client. `prompt` is a string (completion) or a list of (role, content) / {"role","content"}."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`api_key`: sent as `authorization: Bearer <key>` when the server has an API key file.
        `tls_ca`: talk TLS, trusting this CA (PEM); `tls_cert`/`tls_key`: the client certificate for mTLS."""
        self.channel = channel or open_channel(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.stub = guard_pb2_grpc.GuardStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call_metadata(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        return self.metadata + ((("x-request-id", request_id),) if request_id else ())

    def generate(
        self,
        prompt: str | ChatInput,
        *,
        policy: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        metadata: dict[str, str] | None = None,
        trace: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Answer:
        """`request_id`: sent as x-request-id (None: guard makes one); either way it comes back as Answer.request_id."""
        request = _request(prompt, policy, max_tokens, temperature, top_p, seed, stop, metadata, trace)
        response = self.stub.Generate(request, timeout=timeout, metadata=self._call_metadata(request_id))
        return _answer(response.text, response, trace)

    def stream(
        self,
        prompt: str | ChatInput,
        *,
        policy: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        metadata: dict[str, str] | None = None,
        trace: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[str | Answer]:
        """Yields text pieces as they arrive, then one Answer with the whole text.

        On a refusal the last piece and the Answer's text are the refusal text; pieces that
        arrived before a mid-stream refusal were already shown (the Answer does not include them).
        """
        request = _request(prompt, policy, max_tokens, temperature, top_p, seed, stop, metadata, trace)
        pieces: list[str] = []
        for message in self.stub.GenerateStream(request, timeout=timeout, metadata=self._call_metadata(request_id)):
            if message.text:
                pieces.append(message.text)
                yield message.text
            if message.finish_reason:
                yield _answer(message.text if message.refusal.refused else "".join(pieces), message, trace)

    def list_policies(self, *, timeout: float | None = None) -> list[PolicySummary]:
        response = self.stub.ListPolicies(pb.ListPoliciesRequest(), timeout=timeout, metadata=self.metadata)
        return [PolicySummary(p.name, p.version, p.description, p.model, list(p.steps)) for p in response.policies]

    def policy_load_errors(self, *, timeout: float | None = None) -> dict[str, list[str]]:
        """Policy files whose latest edit the server rejected: file -> "file:line: path: reason" issues
        (shown to operators: callers whose key may receive traces, or anyone without keys)."""
        response = self.stub.ListPolicies(pb.ListPoliciesRequest(), timeout=timeout, metadata=self.metadata)
        return {error.file: list(error.issues) for error in response.load_errors}

    def score(
        self, prompt: str | ChatInput, candidates: Sequence[str], *, policy: str, timeout: float | None = None
    ) -> list[float]:
        request = pb.ScoreRequest(policy=policy, candidates=list(candidates))
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            for item in prompt:
                role, content = (item["role"], item["content"]) if isinstance(item, dict) else item
                request.messages.messages.add(role=role, content=content)
        return list(self.stub.Score(request, timeout=timeout, metadata=self.metadata).scores)

    def feedback(
        self,
        request_id: str,
        *,
        thumbs: bool | None = None,
        rating: int | None = None,
        preferred_index: int | None = None,
        correction: str | None = None,
        comment: str = "",
        choice: int = 0,
        timeout: float | None = None,
    ) -> FeedbackReceipt:
        """What the user thought of the answer with this request id (Answer.request_id): thumbs (True: up) or a
        rating (1-5), a preferred best_of_n candidate (Candidate.index), a correction; and a comment.

        Raises grpc.RpcError: NOT_FOUND (no such request of this key's tenant), FAILED_PRECONDITION (guard runs
        without --audit-db, or the policy keeps no text), INVALID_ARGUMENT (naming the field).
        """
        if thumbs is not None and rating is not None:
            raise ValueError("rating: give thumbs or a rating, not both")
        request = pb.FeedbackRequest(request_id=request_id, comment=comment, choice=choice)
        if thumbs is not None:
            request.thumbs = thumbs
        if rating is not None:
            request.rating = rating
        if preferred_index is not None:
            request.preferred_index = preferred_index
        if correction is not None:
            request.correction = correction
        response = self.stub.Feedback(request, timeout=timeout, metadata=self.metadata)
        return FeedbackReceipt(response.request_id, response.policy, response.policy_version)
