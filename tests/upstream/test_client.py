"""The upstream client: real vLLM for behaviour, fault upstreams (real sockets) for failures, failover and ejection."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from guard.errors import status_for
from guard.metrics import REGISTRY, UpstreamMetrics
from guard.types import Message, Sampling
from guard.upstream.client import (
    UpstreamClient,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guard.upstream.resilience import Breaker, RetryBudget
from tests.support.fault_upstream import FaultUpstream
from tests.support.net import free_port

GREEDY = Sampling(max_tokens=8, temperature=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client_for(request):
    clients: list[UpstreamClient] = []

    def make(*urls: str, **kwargs) -> UpstreamClient:
        client = UpstreamClient(list(urls), observer=UpstreamMetrics(), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.mark.integration
async def test_completions_n_and_logprobs(vllm_server, client_for):
    client = client_for(vllm_server.url)
    completion = await client.generate(
        vllm_server.model, prompt="hello world", sampling=Sampling(max_tokens=6, temperature=1.0, n=3, seed=1, logprobs=1), stream=False
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert all(c.token_logprobs and all(lp <= 0 for lp in c.token_logprobs) for c in completion.choices)
    assert completion.upstream_url == vllm_server.url


@pytest.mark.integration
async def test_chat_and_stream_agree_under_greedy(vllm_server, client_for):
    client = client_for(vllm_server.url)
    messages = [Message("user", "tell me a story")]
    whole = await client.generate(vllm_server.model, messages=messages, sampling=GREEDY, stream=False)
    pieces, usage = [], None
    async for delta in client.generate(vllm_server.model, messages=messages, sampling=GREEDY, stream=True):
        pieces.append(delta.text)
        if delta.completion_tokens is not None:
            usage = delta
    assert "".join(pieces) == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == whole.completion_tokens
    assert usage.upstream_url == vllm_server.url


@pytest.mark.integration
async def test_fails_over_from_a_dead_endpoint(vllm_server, client_for):
    dead = f"http://127.0.0.1:{free_port()}"
    client = client_for(dead, vllm_server.url)
    await client.check_health()
    assert [ep.healthy for ep in client.endpoints] == [False, True]
    completion = await client.generate(vllm_server.model, prompt="hi", sampling=GREEDY, stream=False)
    assert completion.upstream_url == vllm_server.url
    # Even when the dead one was not yet known to be dead, the request goes through.
    client.endpoints[0].healthy = True
    client.endpoints[1].in_flight = 5  # make the dead endpoint the first pick
    completion = await client.generate(vllm_server.model, prompt="hi", sampling=GREEDY, stream=False)
    assert completion.upstream_url == vllm_server.url
    # The failure counts toward ejecting it; readiness stays what the /health probe says.
    assert client.endpoints[0].breaker.failures == 1
    await client.check_health()
    assert client.endpoints[0].healthy is False


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
async def test_real_vllm_refusals_map_to_their_statuses(vllm_server, client_for, stream):
    client = client_for(vllm_server.url)

    async def ask(model: str, prompt: str) -> None:
        if stream:
            async for _ in client.generate(model, prompt=prompt, sampling=GREEDY, stream=True):
                pass
        else:
            await client.generate(model, prompt=prompt, sampling=GREEDY, stream=False)

    with pytest.raises(UpstreamMisconfigured, match="does not serve model 'no-such-model'") as raised:
        await ask("no-such-model", "hi")
    assert status_for(raised.value)[0] == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(UpstreamRejected, match="context length") as raised:
        await ask(vllm_server.model, "word " * 2000)
    assert status_for(raised.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert client.endpoints[0].breaker.failures == 0  # vLLM answered: nothing against it


async def test_no_reachable_upstream_is_unavailable(client_for):
    client = client_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamUnavailable):
        await client.generate("m", prompt="hi", sampling=GREEDY, stream=False)


@pytest.mark.parametrize("mode", ["garbage", "error500", "drop"])
async def test_broken_upstream_raises_upstream_error(mode, client_for):
    with FaultUpstream(mode) as fault:
        client = client_for(fault.url)
        with pytest.raises(UpstreamError) as raised:
            await client.generate("m", prompt="hi", sampling=GREEDY, stream=False)
        if mode == "error500":
            assert "engine dead" in str(raised.value)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("stream_garbage", "not JSON"),
        ("stream_truncated", "without \\[DONE\\]"),
        ("garbage", "not events"),
        ("error500", "engine dead"),
        ("drop", "no upstream reachable"),
    ],
)
async def test_broken_stream_raises_upstream_error(client_for, mode, message):
    with FaultUpstream(mode) as fault:
        client = client_for(fault.url)
        with pytest.raises(UpstreamError, match=message):
            async for _ in client.generate("m", prompt="hi", sampling=GREEDY, stream=True):
                pass


async def test_timeout_becomes_upstream_timeout_and_closes_the_request(client_for):
    with FaultUpstream("hang") as fault:
        client = client_for(fault.url)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.generate("m", prompt="hi", sampling=GREEDY, stream=False, timeout=0.5)
        assert time.monotonic() - started < 5
        assert await asyncio.to_thread(fault.disconnects.wait, 5)


async def test_cancelling_the_caller_closes_the_upstream_request(client_for):
    with FaultUpstream("hang") as fault:
        client = client_for(fault.url)
        task = asyncio.create_task(client.generate("m", prompt="hi", sampling=GREEDY, stream=False))
        while not fault.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(fault.disconnects.wait, 5)
        assert client.endpoints[0].in_flight == 0


# -- failover, ejection and retries -----------------------------------------------------------


def ejecting(clock: Clock, threshold: int = 2):
    """Breakers on the test's clock: ejection for exactly half the span (5 s, then 10 s, ...)."""
    return lambda: Breaker(threshold, 10.0, 60.0, clock=clock, rand=lambda: 0.0)


async def generate(client: UpstreamClient, *, stream: bool = False, timeout: float | None = 10.0) -> tuple[str, str | None]:
    """(text, upstream URL) of one prompt, unary or streamed."""
    if not stream:
        completion = await client.generate("m", prompt="hi", sampling=GREEDY, stream=False, timeout=timeout)
        return completion.choices[0].text, completion.upstream_url
    pieces, url = [], None
    async for delta in client.generate("m", prompt="hi", sampling=GREEDY, stream=True, timeout=timeout):
        pieces.append(delta.text)
        url = delta.upstream_url or url
    return "".join(pieces), url


def gauge(url: str) -> float | None:
    return REGISTRY.get_sample_value("guard_upstream_healthy", {"endpoint": url})


async def test_5xx_fails_over_ejects_the_endpoint_and_one_trial_decides_after_the_backoff(client_for):
    clock = Clock()
    with FaultUpstream("error500") as bad, FaultUpstream("slow_ok", hang_seconds=0) as good:
        client = client_for(bad.url, good.url, breaker=ejecting(clock))
        for stream in (False, True):  # ties go to the first endpoint: the bad one
            assert await generate(client, stream=stream) == ("late but fine", good.url)
        assert len(bad.requests) == 2 and client.endpoints[0].breaker.ejected and gauge(bad.url) == 0
        for stream in (False, True, False, True):
            assert await generate(client, stream=stream) == ("late but fine", good.url)
        assert len(bad.requests) == 2, "an ejected endpoint gets no requests while another is available"
        clock.now += 5.0  # the backoff is over: the next request is the trial; it fails, and fails over
        assert await generate(client) == ("late but fine", good.url)
        assert len(bad.requests) == 3
        assert client.endpoints[0].breaker.ejected and client.endpoints[0].breaker.ejection_seconds == 10.0
        bad.mode, bad.hang_seconds = "slow_ok", 0
        clock.now += 10.0
        assert await generate(client, stream=True) == ("late but fine", bad.url)
        assert client.endpoints[0].breaker.ejected_until is None and gauge(bad.url) == 1


async def test_a_passing_health_probe_readmits_after_the_backoff_on_probation(client_for):
    clock = Clock()
    with FaultUpstream("error500") as bad, FaultUpstream("slow_ok", hang_seconds=0) as good:
        client = client_for(bad.url, good.url, breaker=ejecting(clock))
        for _ in range(2):
            await generate(client)
        breaker = client.endpoints[0].breaker
        await client.check_health()
        assert breaker.ejected  # /health passes during the backoff: no effect
        clock.now += 5.0
        await client.check_health()
        assert breaker.ejected_until is None and gauge(bad.url) == 1
        assert await generate(client) == ("late but fine", good.url)  # the bad one failed once more...
        assert len(bad.requests) == 3 and breaker.ejected and breaker.ejection_seconds == 10.0  # ...and is out again
        clock.now += 10.0
        bad.health_status = 503
        await client.check_health()
        assert breaker.ejected and breaker.ejection_seconds == 20.0 and not client.endpoints[0].healthy


async def test_an_ejected_endpoint_is_still_tried_when_it_is_the_only_one(client_for):
    clock = Clock()
    with FaultUpstream("error500") as fault:
        client = client_for(fault.url, breaker=ejecting(clock), max_attempts=1)
        for _ in range(2):
            with pytest.raises(UpstreamError, match="engine dead"):
                await generate(client)
        assert client.endpoints[0].breaker.ejected
        fault.mode, fault.hang_seconds = "slow_ok", 0
        assert await generate(client) == ("late but fine", fault.url)
        assert client.endpoints[0].breaker.ejected_until is None


def test_pick_avoids_ejected_endpoints_and_falls_back_to_the_soonest_back():
    clock = Clock()
    client = UpstreamClient(["http://a", "http://b", "http://c"], breaker=ejecting(clock, threshold=1))
    a, b, c = client.endpoints
    a.breaker.failed()
    clock.now += 1.0
    b.breaker.failed()  # back 1 s after a
    c.in_flight = 9
    assert client._pick(set()) is c, "busy beats ejected"
    assert client._pick({"http://c"}) is c, "an available endpoint already tried beats an ejected one"
    c.breaker.failed()
    assert client._pick(set()) is a
    clock.now += 4.5  # a's backoff is over: it awaits its trial, so it is available again
    a.in_flight = 3
    assert client._pick(set()) is a
    a.breaker.sent()  # its trial is in flight: nobody else goes there while another is available
    clock.now += 0.6
    assert client._pick(set()) is b


async def test_a_stream_that_broke_before_any_text_fails_over(client_for):
    with FaultUpstream("stream_reset") as bad, FaultUpstream("slow_ok", hang_seconds=0) as good:
        bad.events = 0
        client = client_for(bad.url, good.url)
        assert await generate(client, stream=True) == ("late but fine", good.url)
        assert len(bad.requests) == 1 and client.endpoints[0].breaker.failures == 1


async def test_a_stream_that_broke_after_text_is_never_retried(client_for):
    with FaultUpstream("stream_reset") as bad, FaultUpstream("slow_ok", hang_seconds=0) as good:
        client = client_for(bad.url, good.url)
        pieces = []
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="dropped the stream"):
            async for delta in client.generate("m", prompt="hi", sampling=GREEDY, stream=True, timeout=10):
                pieces.append(delta.text)
        assert "".join(pieces) == "piece 0 piece 1 piece 2 " and time.monotonic() - started < 3
        assert good.requests == [] and client.endpoints[0].breaker.failures == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_the_request_s_own_failures_are_not_retried_nor_held_against_the_endpoint(client_for, stream):
    with FaultUpstream("status") as fault, FaultUpstream("slow_ok", hang_seconds=0) as good:
        fault.status, fault.body = 400, b'{"error": {"message": "prompt too long"}}'
        client = client_for(fault.url, good.url)
        client.endpoints[0].breaker.failures = 1
        with pytest.raises(UpstreamRejected, match="prompt too long"):
            await generate(client, stream=stream)
        assert good.requests == [] and client.endpoints[0].breaker.failures == 0  # it answered


async def test_a_timeout_before_the_first_byte_counts_against_the_endpoint_and_is_not_retried(client_for):
    with FaultUpstream("hang", hang_seconds=5) as fault, FaultUpstream("slow_ok", hang_seconds=0) as good:
        client = client_for(fault.url, good.url)
        with pytest.raises(UpstreamTimeout):
            await generate(client, timeout=0.3)
        assert good.requests == [] and client.endpoints[0].breaker.failures == 1


async def test_retries_stop_at_max_attempts_with_backoff_on_a_repeated_endpoint(client_for):
    with FaultUpstream("error500") as fault:
        client = client_for(fault.url, max_attempts=3, retry_backoff=(0.05, 0.1))
        with pytest.raises(UpstreamError, match="engine dead"):
            await generate(client)
        assert len(fault.requests) == 3


async def test_the_retry_budget_keeps_a_dead_fleet_from_a_retry_storm(client_for):
    clock = Clock()
    budget = RetryBudget(ratio=0.25, min_per_second=0.0, window=60.0, clock=clock)
    with FaultUpstream("error500") as one, FaultUpstream("error500") as two:
        client = client_for(one.url, two.url, retry_budget=budget, breaker=ejecting(clock, threshold=100))
        errors = []
        for _ in range(12):
            with pytest.raises(UpstreamError, match="engine dead") as raised:
                await generate(client)
            errors.append(str(raised.value))
        assert len(one.requests) + len(two.requests) == 12 + 3  # 25% extra, not 200%
        assert all("retry budget exhausted" in e for e in errors)


async def test_streams_reuse_the_upstream_connection():
    """A stream is read to the end of its body after [DONE], so the connection is kept for the next request."""
    from guard.types import Sampling
    from guard.upstream.client import UpstreamClient

    accepted = 0
    event = b'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}\n\n'

    async def handle(reader, writer):
        nonlocal accepted
        accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for chunk in (event, b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await writer.drain()
                        await asyncio.sleep(0.005)  # the terminator arrives after [DONE] was read
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = UpstreamClient([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"])
    try:
        await client.start()
        before = accepted
        for _ in range(5):
            texts = [d.text async for d in client.generate("m", prompt="x", sampling=Sampling(max_tokens=1), stream=True)]
            assert "".join(texts) == "hi"
        assert accepted - before <= 1
    finally:
        await client.close()
        server.close()


@pytest.mark.parametrize(("mode", "kind"), [("error500", "http_5xx"), ("garbage", "invalid_response"), ("stream_truncated", "stream_broken")])
async def test_each_failed_attempt_is_reported_once_with_its_kind(client_for, mode, kind):
    with FaultUpstream(mode) as fault:
        client = client_for(fault.url, max_attempts=1)
        before = REGISTRY.get_sample_value("guard_upstream_errors_total", {"endpoint": fault.url, "kind": kind}) or 0.0
        with pytest.raises(UpstreamError):
            await generate(client, stream=mode.startswith("stream"))
        assert REGISTRY.get_sample_value("guard_upstream_errors_total", {"endpoint": fault.url, "kind": kind}) == before + 1
