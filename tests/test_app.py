"""guard assembled in-process (both doors on one event loop) against a fault-injection upstream:
the settings reach both doors, and a stop drains both."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard import limits
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.fault_upstream import FaultUpstream
from tests.support.guard_process import GuardProcess
from tests.support.inprocess import start_app


@pytest.fixture
def fault():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as upstream:
        yield upstream


async def start(tmp_path, fault, **settings):
    return await start_app(tmp_path, fault.url, **settings)


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


async def test_beyond_max_in_flight_requests_are_refused_at_once_on_both_doors(tmp_path, fault):
    fault.hang_seconds = 1.0  # each admitted request holds its place for a second
    app = await start(tmp_path, fault, max_in_flight=4)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", timeout=10
        ) as client:
            stub = guard_pb2_grpc.GuardStub(channel)

            async def over_grpc():
                started = time.monotonic()
                try:
                    await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
                    return "ok", time.monotonic() - started, None
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, time.monotonic() - started, exc.details()

            async def over_http():
                started = time.monotonic()
                response = await client.post("/v1/completions", json={"model": "guard/default", "prompt": "hi"})
                outcome = "ok" if response.status_code == 200 else str(response.status_code)
                return outcome, time.monotonic() - started, response.headers.get("retry-after-ms")

            # 10x the limit at once, through both doors.
            results = await asyncio.gather(*[over_grpc() for _ in range(20)], *[over_http() for _ in range(20)])
        outcomes = [outcome for outcome, _, _ in results]
        assert outcomes.count("ok") == 4
        assert set(outcomes) == {"ok", "RESOURCE_EXHAUSTED", "429"}
        refused = [(seconds, detail) for outcome, seconds, detail in results if outcome != "ok"]
        assert all(seconds < 0.9 for seconds, _ in refused), "refusals must not wait for a place"
        assert {detail for outcome, _, detail in results if outcome == "429"} == {"500"}
        assert all(detail.startswith("overloaded:") for outcome, _, detail in results if outcome == "RESOURCE_EXHAUSTED")
        assert app.service.in_flight == 0
    finally:
        await app.stop(grace=1)
        fault.hang_seconds = 0.0


async def test_health_is_not_serving_without_the_default_policy_and_load_errors_say_why(tmp_path, fault):
    app = await start(tmp_path, fault)
    try:
        (tmp_path / "default.yaml").unlink()
        (tmp_path / "default.yml").write_text("name: default\nsampling: {temperature: hot}\n")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", timeout=5
        ) as client:
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> tuple[int, int]:
                grpc_status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
                return grpc_status, (await client.get("/health")).status_code

            not_serving = (health_pb2.HealthCheckResponse.NOT_SERVING, 503)
            serving = (health_pb2.HealthCheckResponse.SERVING, 200)
            assert await eventually(status, not_serving)
            listed = await guard_pb2_grpc.GuardStub(channel).ListPolicies(pb.ListPoliciesRequest(), timeout=2)
            (error,) = listed.load_errors
            assert error.file.endswith("default.yml") and error.issues[0].endswith(
                "default.yml:2: sampling.temperature: Input should be a valid number, unable to parse string as a number (got 'hot')"
            )
            (tmp_path / "default.yml").write_text("name: default\n")
            assert await eventually(status, serving)
    finally:
        await app.stop(grace=1)


async def eventually(probe, expected, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe() == expected:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_oversized_requests_are_refused_naming_the_field(tmp_path, fault):
    app = await start(tmp_path, fault)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=10) as client:
            huge = {"model": "guard/default", "prompt": "x" * (limits.MAX_REQUEST_BYTES + 10)}
            response = await client.post("/v1/completions", json=huge)
            assert response.status_code == 400 and response.json()["error"]["param"] == "body"
            many = {"model": "guard/default", "messages": [{"role": "user", "content": "hi"}] * (limits.MAX_MESSAGES + 1)}
            response = await client.post("/v1/chat/completions", json=many)
            assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
            long_text = {"model": "guard/default", "messages": [{"role": "user", "content": "x" * (limits.MAX_TEXT_CHARS + 1)}]}
            response = await client.post("/v1/chat/completions", json=long_text)
            assert response.json()["error"]["param"] == "messages[0].content"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = guard_pb2_grpc.GuardStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Generate(pb.GenerateRequest(prompt="x" * (limits.MAX_TEXT_CHARS + 1)), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith("prompt:")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Generate(pb.GenerateRequest(prompt="x" * (2 * limits.MAX_REQUEST_BYTES)), timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the transport's own limit
    finally:
        await app.stop(grace=1)


def test_a_taken_port_is_a_clear_startup_error(tmp_path, fault):
    (tmp_path / "default.yaml").write_text("name: default\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = GuardProcess(
            tmp_path, [fault.url], model="fault-model", log_path=tmp_path / "guard.log", extra=["--http-port", str(port)]
        )
        code = process.process.wait(60)
        process.terminate()  # closes its log
    log = process.log()
    assert code == 1, log
    assert f"cannot start: cannot bind HTTP port 127.0.0.1:{port}" in log
    assert "Traceback" not in log and "never awaited" not in log


async def test_reward_models_follow_the_policies_that_name_them(tmp_path, fault, tiny_reward_dir):
    from guard.policy.reward import SequenceClassifierReward

    reward = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    ranked = tmp_path / "ranked.yaml"
    ranked.write_text(f"name: ranked\nsteps: [{{type: best_of_n, n: 2, reward: {{type: sequence_classifier, path: '{reward.path}'}}}}]\n")
    app = await start(tmp_path, fault)
    try:
        await app.reranker.settled()
        assert app.reranker.is_loaded(reward)  # loaded with its policy, before any best-of-n request
        ranked.unlink()
        app.store.reload_now()
        await app.reranker.settled()
        assert not app.reranker.is_loaded(reward)  # and unloaded with it
        assert app.serving
    finally:
        await app.stop(grace=1)
