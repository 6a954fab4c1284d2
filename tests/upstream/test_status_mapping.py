"""What each upstream answer becomes: the client's exception, then the gRPC status clients see (over real sockets)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import grpc
import pytest

from guard.errors import ResourceExhausted, status_for
from guard.types import Sampling
from guard.upstream.client import (
    UpstreamClient,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    _retry_after,
)
from tests.support.fault_upstream import FaultUpstream

TOO_LONG = "This model's maximum context length is 16 tokens. However, you requested 40 tokens."


@pytest.fixture(scope="module")
def fault():
    with FaultUpstream("status") as upstream:
        yield upstream


@pytest.fixture
async def client(fault):
    # One try: each case is about one answer, not about retries.
    client = UpstreamClient([fault.url], max_attempts=1)
    yield client
    await client.close()


def error(message: str) -> bytes:
    return json.dumps({"error": {"message": message}}).encode()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "body", "raised", "code", "says"),
    [
        (400, error(TOO_LONG), UpstreamRejected, grpc.StatusCode.INVALID_ARGUMENT, TOO_LONG),
        (422, b'{"detail": [{"loc": ["body", "top_p"], "msg": "Input should be a valid number"}]}',
         UpstreamRejected, grpc.StatusCode.INVALID_ARGUMENT, "Input should be a valid number"),
        (401, error("Unauthorized"), UpstreamMisconfigured, grpc.StatusCode.UNAVAILABLE, "refused guard's upstream credentials"),
        (403, error("Forbidden"), UpstreamMisconfigured, grpc.StatusCode.UNAVAILABLE, "refused guard's upstream credentials"),
        (404, error("The model `m` does not exist."), UpstreamMisconfigured, grpc.StatusCode.UNAVAILABLE,
         "does not serve model 'm'"),
        (429, error("slow down"), UpstreamRateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"),
        (500, error("engine dead"), UpstreamServerError, grpc.StatusCode.UNAVAILABLE, "HTTP 500: engine dead"),
        (503, error("overloaded"), UpstreamServerError, grpc.StatusCode.UNAVAILABLE, "HTTP 503: overloaded"),
    ],
)
async def test_each_upstream_status_maps_to_a_client_facing_status(fault, client, stream, status, body, raised, code, says):
    fault.mode, fault.status, fault.body, fault.headers = "status", status, body, {}
    with pytest.raises(UpstreamError) as caught:
        await generate(client, stream)
    assert type(caught.value) is raised
    mapped, message = status_for(caught.value)
    assert mapped == code and says in message and fault.url in message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("headers", "seconds"),
    [({}, 1.0), ({"Retry-After": "7"}, 7.0), ({"Retry-After": "soon"}, 1.0), ({"retry-after-ms": "250"}, 0.25)],
)
async def test_429_is_resource_exhausted_with_the_upstream_s_retry_hint(fault, client, stream, headers, seconds):
    fault.mode, fault.status, fault.body, fault.headers = "status", 429, error("slow down"), headers
    with pytest.raises(ResourceExhausted) as caught:
        await generate(client, stream)
    assert caught.value.retry_after == pytest.approx(seconds)
    assert isinstance(caught.value, UpstreamError)  # guard-model rules catch it as an upstream failure


def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= _retry_after({"Retry-After": when}) <= 30
    assert _retry_after({"retry-after": "-3"}) == 0.0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_completion_without_choices_is_unavailable_not_an_empty_answer(fault, client, stream):
    fault.mode = "empty_choices"
    with pytest.raises(UpstreamError) as caught:
        await generate(client, stream)
    assert type(caught.value) is UpstreamInvalidResponse
    mapped, message = status_for(caught.value)
    assert mapped == grpc.StatusCode.UNAVAILABLE
    assert "no choices" in message or "without any choice" in message


async def generate(client: UpstreamClient, stream: bool) -> None:
    sampling = Sampling(max_tokens=4)
    if stream:
        async for _ in client.generate("m", prompt="hi", sampling=sampling, stream=True, timeout=5):
            pass
    else:
        await client.generate("m", prompt="hi", sampling=sampling, stream=False, timeout=5)


@pytest.mark.parametrize("chat", [False, True])
def test_a_garbled_finish_reason_is_an_upstream_error_not_passed_on(chat):
    from guard.upstream.client import UpstreamError, _parse_completion

    choice = {"index": 0, "finish_reason": "len4th", "text": "x", "message": {"content": "x"}}
    with pytest.raises(UpstreamError, match="finish_reason"):
        _parse_completion({"choices": [choice], "usage": {}}, "http://u", chat=chat)
    choice["finish_reason"] = "length"
    assert _parse_completion({"choices": [choice], "usage": {}}, "http://u", chat=chat).choices[0].finish_reason == "length"
