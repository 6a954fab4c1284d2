"""Every generation request through either door leaves one record, however it ends; text only as its
policy allows, and never in /metrics."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import httpx
import pytest
from prometheus_client import generate_latest

from guard.audit import AuditQuery, AuditRecord
from guard.metrics import REGISTRY
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess import start_app

POLICIES = {
    "refusing": """
name: refusing
audit: {text: full}
limits: {max_n: 2}
steps:
  - type: input_filter
    name: bombs
    rules: [{name: bomb, keywords: ["pipe bomb"]}]
    refusal: "No."
""",
    "hashing": "name: hashing\naudit: {text: hashed}\n",
}
UPSTREAM_ANSWER = "late but fine"  # what the fault upstream's slow_ok mode answers


@pytest.fixture
def fault():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as upstream:
        yield upstream


@pytest.fixture
async def app(tmp_path, fault):
    for name, text in POLICIES.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    app = await start_app(tmp_path, fault.url, audit_db=tmp_path / "audit.db")
    yield app
    await app.stop(grace=1)


@pytest.fixture
async def stub(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield guard_pb2_grpc.GuardStub(channel)


@pytest.fixture
async def http(app):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        yield client


async def record(app, request_id: str) -> AuditRecord:
    """The request's one record, once the writer has it (a cancelled request ends after its caller gave up)."""
    for _ in range(200):
        await asyncio.to_thread(app.audit.flush)
        found = list(app.audit.query(AuditQuery(request_id=request_id)))
        if found:
            assert len(found) == 1
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no audit record of {request_id}")


def metadata(request_id: str) -> tuple:
    return (("x-request-id", request_id),)


async def test_grpc_answers_and_refusals_are_recorded_with_their_decisions(app, stub):
    await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata("g-ok"), timeout=10)
    await stub.Generate(pb.GenerateRequest(prompt="a pipe bomb", policy="refusing"), metadata=metadata("g-no"), timeout=10)
    ok, refused = await record(app, "g-ok"), await record(app, "g-no")
    assert (ok.rpc, ok.tenant, ok.policy, ok.model) == ("Generate", "anonymous", "default", "fault-model")
    assert (ok.outcome, ok.status) == ("ok", "OK")
    assert ok.policy_version == app.store.get("default").version
    assert (ok.prompt_tokens, ok.completion_tokens, ok.choices[0].finish_reason) == (3, 3, "stop")
    assert ok.text == "none" and ok.input is None and ok.choices[0].output is None
    assert (refused.outcome, refused.refusal.step, refused.refusal.rule, refused.refusal.stage) == ("refused", "bombs", "bomb", "input")
    assert refused.choices[0].steps[0].detail == {"matched": "bomb"}
    assert (refused.input, refused.choices[0].output) == ("a pipe bomb", "No.")  # audit: {text: full}


async def test_a_grpc_stream_is_recorded_once_it_ends(app, stub):
    request = pb.GenerateRequest(prompt="hi", policy="hashing")
    [_ async for _ in stub.GenerateStream(request, metadata=metadata("s-1"), timeout=10)]
    streamed = await record(app, "s-1")
    assert (streamed.rpc, streamed.outcome, streamed.text) == ("GenerateStream", "ok", "hashed")
    assert streamed.input == hashlib.sha256(b"hi").hexdigest()
    assert streamed.choices[0].output == hashlib.sha256(UPSTREAM_ANSWER.encode()).hexdigest()


async def test_http_requests_are_recorded_one_per_request_with_a_choice_each(app, http):
    chat = {"model": "guard/refusing", "messages": [{"role": "user", "content": "a pipe bomb"}], "n": 2}
    assert (await http.post("/v1/chat/completions", json=chat, headers={"x-request-id": "h-no"})).status_code == 200
    streamed = {"model": "guard/default", "prompt": "hi", "stream": True}
    assert (await http.post("/v1/completions", json=streamed, headers={"x-request-id": "h-ok"})).status_code == 200
    refused, ok = await record(app, "h-no"), await record(app, "h-ok")
    assert (refused.rpc, refused.outcome, len(refused.choices)) == ("chat.completions", "refused", 2)
    assert refused.input == [{"role": "user", "content": "a pipe bomb"}]
    assert (ok.rpc, ok.outcome, ok.status) == ("completions", "ok", "OK")


async def test_failures_are_recorded_with_their_status(app, stub, http, fault):
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt="hi", policy="nope"), metadata=metadata("unknown"), timeout=10)
    fault.mode = "error500"
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata("down"), timeout=10)
    completion = {"model": "guard/default", "prompt": "hi"}
    assert (await http.post("/v1/completions", json=completion, headers={"x-request-id": "h-down"})).status_code == 503
    fault.mode, fault.hang_seconds = "hang", 10.0
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata("late"), timeout=0.5)

    unknown, down, http_down, late = [await record(app, i) for i in ("unknown", "down", "h-down", "late")]
    assert (unknown.outcome, unknown.status, unknown.policy) == ("error", "NOT_FOUND", "")
    assert "nope" in unknown.error
    assert (down.outcome, down.status, down.policy) == ("error", "UNAVAILABLE", "default") and down.error
    assert (http_down.rpc, http_down.status) == ("completions", "UNAVAILABLE")
    assert (late.status, late.choices) == ("DEADLINE_EXCEEDED", ())


async def test_a_cancelled_request_is_recorded_as_cancelled(app, stub, fault):
    fault.mode, fault.hang_seconds = "hang", 10.0
    call = stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata("gone"), timeout=10)
    while not fault.requests:
        await asyncio.sleep(0.02)
    call.cancel()
    cancelled = await record(app, "gone")
    assert (cancelled.outcome, cancelled.status) == ("error", "CANCELLED")


async def test_a_request_guard_could_not_read_is_not_recorded(app, http):
    response = await http.post("/v1/chat/completions", content=b"{not json", headers={"x-request-id": "garbled"})
    assert response.status_code == 400
    await http.post("/v1/completions", json={"model": "guard/default", "prompt": "hi"}, headers={"x-request-id": "after"})
    await record(app, "after")
    assert list(app.audit.query(AuditQuery(request_id="garbled"))) == []


async def test_text_kept_in_full_never_reaches_metrics(app, stub):
    secret = "zanzibar-quartz-pipe bomb"
    await stub.Generate(pb.GenerateRequest(prompt=secret, policy="refusing"), metadata=metadata("secret"), timeout=10)
    assert (await record(app, "secret")).input == secret
    exposition = generate_latest(REGISTRY).decode()
    assert "zanzibar" not in exposition and 'guard_audit_records_total{result="written"}' in exposition
