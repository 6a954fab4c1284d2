"""The remote source's error handling, against a deliberately broken server.

Its happy path needs a real vLLM pooling server and belongs to integration tests.
"""

from __future__ import annotations

import time

import pytest

from guard.policy.reward import RemoteReward
from guard.rerank import Reranker, RerankError
from guard.types import Message
from tests.support.fault_upstream import FaultUpstream
from tests.support.net import free_port


@pytest.mark.parametrize("api", ["score", "pooling"])
@pytest.mark.parametrize(
    ("mode", "message"), [("error500", "HTTP 500"), ("garbage", "not JSON"), ("drop", "RemoteProtocolError|ReadError")]
)
async def test_broken_server_is_a_rerank_error(reranker: Reranker, api, mode, message):
    with FaultUpstream(mode) as server:
        config = RemoteReward(type="remote", url=server.url, model="rm", api=api)
        with pytest.raises(RerankError, match=message):
            await reranker.score(config, [Message("user", "hi")], ["a", "b"])
        assert server.requests and server.requests[0] == f"/{api}"


async def test_hanging_server_times_out_and_the_request_is_abandoned(reranker: Reranker):
    with FaultUpstream("hang", hang_seconds=10) as server:
        config = RemoteReward(type="remote", url=server.url, model="rm", timeout_seconds=5)
        started = time.monotonic()
        with pytest.raises(RerankError, match="within 0.3s"):
            await reranker.score(config, "hi", ["a"], timeout=0.3)
        assert time.monotonic() - started < 2
        assert server.disconnects.wait(2)  # the connection was closed, not left hanging


async def test_unreachable_server_is_a_rerank_error(reranker: Reranker):
    config = RemoteReward(type="remote", url=f"http://127.0.0.1:{free_port()}", model="rm")
    with pytest.raises(RerankError, match="ConnectError"):
        await reranker.score(config, "hi", ["a"])


@pytest.mark.parametrize("api", ["score", "pooling"])
async def test_json_of_the_wrong_shape_is_a_rerank_error(reranker: Reranker, api):
    # A completions-shaped body: valid JSON, no scores in it.
    with FaultUpstream("slow_ok", hang_seconds=0) as server:
        config = RemoteReward(type="remote", url=server.url, model="rm", api=api)
        with pytest.raises(RerankError, match="malformed response"):
            await reranker.score(config, [Message("user", "hi")], ["a", "b"])
