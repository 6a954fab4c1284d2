"""What both doors do alike through GuardService: request ids end to end, refusals and time to first text
counted where the request is answered."""

from __future__ import annotations

import grpc
import httpx
import pytest

from guard.metrics import REGISTRY
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess import start_app

REFUSING = """
name: refusing
limits: {max_n: 2}
steps:
  - type: input_filter
    name: bombs
    rules: [{name: bomb, keywords: ["pipe bomb"]}]
    refusal: "No."
"""


@pytest.fixture
def fault():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as upstream:
        yield upstream


@pytest.fixture
async def app(tmp_path, fault):
    (tmp_path / "refusing.yaml").write_text(REFUSING)
    app = await start_app(tmp_path, fault.url)
    yield app
    await app.stop(grace=1)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_grpc_caller_s_request_id_reaches_vllm_and_comes_back(app, fault):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = guard_pb2_grpc.GuardStub(channel)
        answer = await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=(("x-request-id", "trace-42"),), timeout=10)
        assert answer.request_id == "trace-42" and fault.request_ids[-1] == "trace-42"
        made = [(await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)).request_id for _ in range(2)]
        assert made[0] != made[1] and all(len(i) == 32 for i in made)  # one of guard's own, fresh each time
        assert fault.request_ids[-2:] == made
        messages = [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt="hi"), metadata=(("x-request-id", "s-1"),), timeout=10)]
        assert messages[0].request_id == messages[-1].request_id == "s-1"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=(("x-request-id", "has space"),), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in raised.value.details()


async def test_an_http_caller_s_request_id_reaches_vllm_and_comes_back(app, fault):
    chat = {"model": "guard/default", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        response = await client.post("/v1/chat/completions", json=chat, headers={"x-request-id": "web-7"})
        assert response.headers["x-request-id"] == "web-7" and response.json()["id"] == "chatcmpl-web-7"
        assert fault.request_ids[-1] == "web-7"
        response = await client.post("/v1/chat/completions", json=chat)
        assert response.json()["id"] == "chatcmpl-" + response.headers["x-request-id"] == "chatcmpl-" + fault.request_ids[-1]
        response = await client.post("/v1/chat/completions", json=chat, headers={"x-request-id": "x" * 129})
        assert response.status_code == 400 and response.json()["error"]["param"] == "x-request-id"


async def test_refusals_are_counted_once_per_refused_answer_on_either_door(app):
    labels = {"policy": "refusing", "step": "bombs", "stage": "input"}
    before = sample("guard_refusals_total", **labels)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        answer = await guard_pb2_grpc.GuardStub(channel).Generate(pb.GenerateRequest(prompt="a pipe bomb", policy="refusing"), timeout=10)
    assert answer.refusal.refused
    chat = {"model": "guard/refusing", "messages": [{"role": "user", "content": "a pipe bomb"}], "n": 2}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        assert (await client.post("/v1/chat/completions", json=chat)).json()["choices"][1]["finish_reason"] == "content_filter"
    assert sample("guard_refusals_total", **labels) == before + 3


async def test_time_to_first_text_is_observed_for_streams_only(app):
    def count(rpc: str) -> float:
        return sample("guard_time_to_first_token_seconds_count", rpc=rpc, policy="default")

    stream_before, unary_before, http_before = count("GenerateStream"), count("Generate"), count("chat.completions")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = guard_pb2_grpc.GuardStub(channel)
        [_ async for _ in stub.GenerateStream(pb.GenerateRequest(prompt="hi"), timeout=10)]
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        chat = {"model": "guard/default", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert (count("GenerateStream"), count("Generate"), count("chat.completions")) == (stream_before + 1, unary_before, http_before + 1)
