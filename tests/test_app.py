"""guard assembled in-process (both doors on one event loop) against a fault-injection upstream:
the settings reach both doors, and a stop drains both."""

from __future__ import annotations

import grpc
import httpx
import pytest

from guard.app import GuardApp
from guard.settings import Settings
from guard.upstream.client import UpstreamClient
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.fault_upstream import FaultUpstream


@pytest.fixture
def fault():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as upstream:
        yield upstream


async def start(tmp_path, fault, **settings) -> GuardApp:
    (tmp_path / "default.yaml").write_text("name: default\n")
    (tmp_path / "fixed.yaml").write_text("name: fixed\nsteps: [{type: system_prompt, content: Be brief.}]\n")
    app = GuardApp(
        Settings(**{"port": 0, "http_port": 0, "metrics_port": 0, "policies": tmp_path, "poll_seconds": 0.1, **settings}),
        UpstreamClient([fault.url]),
        "fault-model",
    )
    await app.start()
    return app


async def test_one_allowed_policy_is_fixed_for_both_doors(tmp_path, fault):
    app = await start(tmp_path, fault, allow_policies=["fixed"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = guard_pb2_grpc.GuardStub(channel)
            answer = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert answer.policy == "fixed" and answer.text == "late but fine"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Generate(pb.GenerateRequest(prompt="hi", policy="default"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            listed = await stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
            assert [p.name for p in listed.policies] == ["fixed"] and listed.default_policy == "fixed"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            chat = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]}
            response = await client.post("/v1/chat/completions", json=chat)
            assert response.status_code == 200 and response.json()["model"] == "guard/fixed"
            denied = await client.post("/v1/chat/completions", json={**chat, "model": "guard/default"})
            assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    finally:
        await app.stop(grace=1)


async def test_http_door_can_be_turned_off_and_stop_closes_both_ports(tmp_path, fault):
    app = await start(tmp_path, fault, http_port=-1)
    grpc_port = app.port
    assert app.http is None and app.http_port == 0
    await app.stop(grace=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await guard_pb2_grpc.GuardStub(channel).ListPolicies(pb.ListPoliciesRequest(), timeout=2)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    app = await start(tmp_path, fault)
    http_port = app.http_port
    await app.stop(grace=1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2)
