"""The upstream client: real vLLM for behaviour, a fault upstream for failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from guard.types import Message, Sampling
from guard.upstream.client import UpstreamClient, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from tests.support.fault_upstream import FaultUpstream
from tests.support.net import free_port

GREEDY = Sampling(max_tokens=8, temperature=0.0)


@pytest.fixture
async def client_for(request):
    clients: list[UpstreamClient] = []

    def make(*urls: str, **kwargs) -> UpstreamClient:
        client = UpstreamClient(list(urls), **kwargs)
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
    assert client.endpoints[0].healthy is False


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
