"""Request validation names the field; every failure maps to the right gRPC status."""

from __future__ import annotations

import grpc
import pytest

from guard.server import convert
from guard.errors import InvalidArgument, status_for
from guard.upstream.client import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from guard.v1 import guard_pb2 as pb


def request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (request(), "input"),
        (request(prompt=""), "prompt"),  # setting a oneof member, even to "", selects it
        (pb.GenerateRequest(messages=pb.ChatMessages()), "messages"),
        (request(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])), "messages[0].role"),
        (request(prompt="x", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
        (request(prompt="x", sampling=pb.SamplingParams(max_tokens=10**6)), "sampling.max_tokens"),
        (request(prompt="x", sampling=pb.SamplingParams(temperature=-0.5)), "sampling.temperature"),
        (request(prompt="x", sampling=pb.SamplingParams(temperature=3)), "sampling.temperature"),
        (request(prompt="x", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
        (request(prompt="x", sampling=pb.SamplingParams(stop=[""])), "sampling.stop"),
        (request(prompt="x", metadata={"k" * 300: "v"}), "metadata"),
    ],
)
def test_invalid_requests_name_the_field(message, field):
    with pytest.raises(InvalidArgument) as raised:
        convert.generate_input(message)
    assert str(raised.value).startswith(f"{field}:")
    assert status_for(raised.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_valid_request_converts_with_unset_sampling_as_none():
    converted = convert.generate_input(
        request(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
            policy="p",
            sampling=pb.SamplingParams(temperature=0.0, stop=["\n"]),
            include_trace=True,
        )
    )
    assert converted.is_chat and converted.messages[0].content == "hi"
    # temperature=0 is a real value (greedy), distinct from "not set".
    assert converted.sampling.temperature == 0.0
    assert converted.sampling.max_tokens is None and converted.sampling.top_p is None
    assert converted.sampling.stop == ("\n",)
    assert converted.include_trace


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UpstreamUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (UpstreamTimeout("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (UpstreamRejected("HTTP 400: too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (UpstreamError("garbage"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc, code):
    mapped, message = status_for(exc)
    assert mapped == code
    if code == grpc.StatusCode.INTERNAL:
        assert "bug" not in message  # internals are logged, not leaked
    else:
        assert str(exc) in message


def test_unknown_policy_is_not_found():
    from guard.policy.store import UnknownPolicy

    mapped, message = status_for(UnknownPolicy("unknown policy 'nope' (known: default)"))
    assert mapped == grpc.StatusCode.NOT_FOUND
    assert message.startswith("policy:") and "nope" in message
