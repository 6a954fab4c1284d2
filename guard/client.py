"""A small typed Python client for guard's gRPC API.

    from guard.client import GuardClient
    with GuardClient("127.0.0.1:50051") as guard:
        answer = guard.generate("What is the capital of France?", policy="safe-assistant")
        print(answer.text)
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
    ) -> Answer:
        request = _request(prompt, policy, max_tokens, temperature, top_p, seed, stop, metadata, trace)
        response = self.stub.Generate(request, timeout=timeout, metadata=self.metadata)
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
    ) -> Iterator[str | Answer]:
        """Yields text pieces as they arrive, then one Answer with the whole text.

        On a refusal the last piece and the Answer's text are the refusal text; pieces that
        arrived before a mid-stream refusal were already shown (the Answer does not include them).
        """
        request = _request(prompt, policy, max_tokens, temperature, top_p, seed, stop, metadata, trace)
        pieces: list[str] = []
        for message in self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata):
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
