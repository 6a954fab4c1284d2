"""A real guard process against upstreams that fail: statuses, cancellation, graceful shutdown,
streams reset midway, failover and ejection."""

from __future__ import annotations

import json
import re
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.client import GuardClient
from tests.support.fault_upstream import FaultUpstream
from tests.support.guard_process import GuardProcess
from tests.support.net import free_port


@pytest.fixture(scope="module")
def fault():
    with FaultUpstream("hang", hang_seconds=30) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def guard_on_fault(fault, tmp_path_factory):
    policies = tmp_path_factory.mktemp("fault-policies")
    (policies / "default.yaml").write_text("name: default\n")
    moderated = "steps:\n  - type: output_filter\n    stream_holdback_chars: 16\n    stream_check_every_chars: 8\n"
    (policies / "stream-block.yaml").write_text(
        "name: stream-block\nrefusal: Filtered.\n" + moderated + "    rules: [{name: piece-five, regex: ['piece 5\\b']}]\n"
    )
    (policies / "stream-pass.yaml").write_text("name: stream-pass\n" + moderated + "    rules: [{name: never, keywords: [zqxj]}]\n")
    process = GuardProcess(policies, [fault.url], model="fault-model", log_path=policies / "guard.log")
    try:
        process.wait_serving(timeout=60)
        yield process
    finally:
        process.terminate()


@pytest.fixture
def client(guard_on_fault, fault):
    fault.disconnects.clear()
    with GuardClient(guard_on_fault.target) as guard:
        yield guard


@pytest.mark.parametrize("mode", ["garbage", "error500", "drop"])
def test_broken_upstream_is_unavailable_with_a_reason(client, fault, mode):
    fault.mode = mode
    with pytest.raises(grpc.RpcError) as raised:
        client.generate("hi", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "upstream" in raised.value.details()


def test_hanging_upstream_hits_the_client_deadline_and_is_closed(client, fault):
    fault.mode = "hang"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        client.generate("hi", timeout=1.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert fault.disconnects.wait(5), "guard must close the upstream request when the deadline passes"


def test_client_cancel_closes_the_upstream_request(client, fault):
    fault.mode = "hang"
    future = client.stub.Generate.future(__import__("guard.v1.guard_pb2", fromlist=["x"]).GenerateRequest(prompt="hi"))
    deadline = time.monotonic() + 5
    while len(fault.requests) == 0 or not future.running():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    future.cancel()
    assert fault.disconnects.wait(5), "a cancelled call must close its upstream request"


def test_client_cancelling_a_stream_closes_the_upstream_request(client, fault):
    from guard.v1 import guard_pb2 as pb

    fault.mode = "hang"
    before = len(fault.requests)
    call = client.stub.GenerateStream(pb.GenerateRequest(prompt="hi"))
    deadline = time.monotonic() + 5
    while len(fault.requests) == before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    call.cancel()
    assert fault.disconnects.wait(5), "a cancelled stream must close its upstream request"


@pytest.fixture
def trickle(fault):
    """The upstream streams 100 pieces, one every 20 ms (2 s in all), like a model generating."""
    fault.mode, fault.events, fault.hang_seconds, fault.sent_events = "trickle", 100, 0.02, 0
    yield fault
    fault.events, fault.hang_seconds = 3, 30


def test_a_streamed_block_refuses_and_closes_the_upstream_stream(client, trickle):
    *pieces, final = list(client.stream("hi", policy="stream-block", timeout=30))
    assert final.refused and final.refusal["rule"] == "piece-five" and pieces[-1] == "Filtered."
    assert "piece 5" not in "".join(pieces[:-1])  # what was released never includes the match
    assert trickle.disconnects.wait(5), "a block must close the upstream request (vLLM then aborts it)"
    assert trickle.sent_events < 20  # the upstream was stopped soon after piece 5, not left to run 100


@pytest.mark.parametrize("policy", ["stream-pass", "default"])
def test_text_arrives_in_pieces_while_the_upstream_is_still_generating(client, trickle, policy):
    """Moderated or not, a stream passes text on as it comes (pieces of what arrived together, not the whole)."""
    sent_at_first_piece = None
    events = []
    for event in client.stream("hi", policy=policy, timeout=30):
        if sent_at_first_piece is None and isinstance(event, str):
            sent_at_first_piece = trickle.sent_events
        events.append(event)
    *pieces, final = events
    assert not final.refused and "".join(pieces) == "".join(f"piece {i} " for i in range(100))
    assert sent_at_first_piece is not None and sent_at_first_piece < 20, sent_at_first_piece
    assert len(pieces) > 10


def test_no_reachable_upstream_is_unavailable(tmp_path):
    (tmp_path / "default.yaml").write_text("name: default\n")
    process = GuardProcess(tmp_path, [f"http://127.0.0.1:{free_port()}"], model="m", log_path=tmp_path / "guard.log")
    try:
        # Health reports NOT_SERVING while no upstream answers, but guard stays up and answers clearly.
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(process.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, process.log()
                    time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with GuardClient(process.target) as guard, pytest.raises(grpc.RpcError) as raised:
            guard.generate("hi", timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.terminate()


def test_sigterm_lets_in_flight_requests_finish(fault, tmp_path):
    fault.mode = "slow_ok"
    fault.hang_seconds = 1.5
    (tmp_path / "default.yaml").write_text("name: default\n")
    process = GuardProcess(tmp_path, [fault.url], model="fault-model", log_path=tmp_path / "guard.log")
    try:
        process.wait_serving(timeout=60)
        results: dict = {}

        def call():
            with GuardClient(process.target) as guard:
                try:
                    results["answer"] = guard.generate("hi", timeout=20)
                except grpc.RpcError as exc:
                    results["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        requests_before = len(fault.requests)
        deadline = time.monotonic() + 10
        while len(fault.requests) == requests_before:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        code = process.terminate()
        thread.join(20)
        assert "error" not in results, results.get("error")
        assert results["answer"].text == "late but fine"
        assert code == 0, process.log()
        assert "draining" in process.log()
    finally:
        process.terminate()
        fault.hang_seconds = 30


def test_a_stream_reset_midway_ends_with_unavailable_not_a_hang(client, fault):
    fault.mode = "stream_reset"
    requests_before = len(fault.requests)
    pieces = []
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        for piece in client.stream("hi", timeout=20):
            pieces.append(piece)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "dropped the stream" in raised.value.details()
    assert "".join(pieces) == "piece 0 piece 1 piece 2 "
    assert time.monotonic() - started < 5
    assert len(fault.requests) == requests_before + 1, "text was streamed: never retried"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_reset_midway_is_an_error_event_on_the_http_door(guard_on_fault, fault, path):
    fault.mode = "stream_reset"
    body = {"model": "fault-model", "stream": True}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    started = time.monotonic()
    with httpx.stream("POST", f"{guard_on_fault.http_url}{path}", json=body, timeout=20) as response:
        assert response.status_code == 200  # the failure came after the first event
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert time.monotonic() - started < 5
    *chunks, last = events
    text = "".join(
        (choice.get("text") or (choice.get("delta") or {}).get("content") or "") for chunk in chunks for choice in chunk["choices"]
    )
    assert text == "piece 0 piece 1 piece 2 "
    assert last["error"]["code"] == "unavailable" and "dropped the stream" in last["error"]["message"]


def upstream_healthy(process: GuardProcess, url: str) -> float:
    metrics = httpx.get(process.metrics_url, timeout=5).text
    found = re.search(rf'^guard_upstream_healthy{{endpoint="{re.escape(url)}"}} (\S+)$', metrics, re.MULTILINE)
    assert found, metrics
    return float(found.group(1))


def test_5xx_fails_over_and_the_failing_upstream_gets_nothing_while_ejected(tmp_path):
    with FaultUpstream("error500") as bad, FaultUpstream("slow_ok", hang_seconds=0) as good:
        (tmp_path / "default.yaml").write_text("name: default\n")
        process = GuardProcess(tmp_path, [bad.url, good.url], model="fault-model", log_path=tmp_path / "guard.log")
        chat = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]}
        try:
            process.wait_serving(timeout=60)
            with GuardClient(process.target) as guard:
                # Sequential requests tie on load: each tries the bad one first, until it is ejected.
                for _ in range(10):
                    assert guard.generate("hi", timeout=10).text == "late but fine"
                    if upstream_healthy(process, bad.url) == 0:
                        break
                ejected_at = time.monotonic()
                assert upstream_healthy(process, bad.url) == 0 and "ejected for" in process.log()
                assert upstream_healthy(process, good.url) == 1
                metrics = httpx.get(process.metrics_url, timeout=5).text
                assert f'guard_upstream_ejections_total{{endpoint="{bad.url}"}} 1.0' in metrics
                assert re.search(r'^guard_upstream_retries_total\{outcome="retried"\} [1-9]', metrics, re.MULTILINE)
                seen = len(bad.requests)
                for _ in range(3):
                    assert guard.generate("hi", timeout=10).text == "late but fine"
                    *pieces, answer = guard.stream("hi", timeout=10)
                    assert "".join(pieces) == answer.text == "late but fine"
                    response = httpx.post(f"{process.http_url}/v1/chat/completions", json=chat, timeout=10)
                    assert response.status_code == 200
                    assert response.json()["choices"][0]["message"]["content"] == "late but fine"
                # The first ejection lasts at least 5 s (10 s, jittered down to half at most).
                assert time.monotonic() - ejected_at < 5
                assert len(bad.requests) == seen, "an ejected upstream gets no requests while another is available"
                assert len(good.requests) >= 9 + seen
        finally:
            process.terminate()
