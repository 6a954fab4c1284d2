"""The HTTP door against an upstream that fails: statuses, client disconnects, deadlines, drain on SIGTERM."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.fault_upstream import FaultUpstream
from tests.support.guard_process import GuardProcess

CHAT = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def fault():
    with FaultUpstream("hang", hang_seconds=30) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def guard_on_fault(fault, tmp_path_factory):
    policies = tmp_path_factory.mktemp("http-fault-policies")
    (policies / "default.yaml").write_text("name: default\n")
    process = GuardProcess(policies, [fault.url], model="fault-model", log_path=policies / "guard.log")
    try:
        process.wait_serving(timeout=60)
        yield process
    finally:
        process.terminate()


@pytest.fixture
def url(guard_on_fault, fault):
    fault.disconnects.clear()
    return f"{guard_on_fault.http_url}/v1/chat/completions"


@pytest.mark.parametrize("mode", ["garbage", "error500", "drop"])
@pytest.mark.parametrize("stream", [False, True])
def test_broken_upstream_is_a_503_with_a_reason(url, fault, mode, stream):
    fault.mode = mode
    response = httpx.post(url, json={**CHAT, "stream": stream}, timeout=20)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "upstream" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_closes_the_upstream_request(url, fault, stream):
    fault.mode = "hang"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={**CHAT, "stream": stream}, timeout=httpx.Timeout(1.0, connect=5.0))
    assert fault.disconnects.wait(5), "guard must close the upstream request when its client disconnects"


def test_the_timeout_header_is_a_504_and_closes_the_upstream_request(url, fault):
    fault.mode = "hang"
    started = time.monotonic()
    response = httpx.post(url, json=CHAT, headers={"X-Guard-Timeout-Seconds": "0.5"}, timeout=20)
    assert response.status_code == 504 and time.monotonic() - started < 5
    assert fault.disconnects.wait(5)


def test_sigterm_lets_in_flight_http_requests_finish(fault, tmp_path):
    fault.mode = "slow_ok"
    fault.hang_seconds = 1.5
    (tmp_path / "default.yaml").write_text("name: default\n")
    process = GuardProcess(tmp_path, [fault.url], model="fault-model", log_path=tmp_path / "guard.log")
    try:
        process.wait_serving(timeout=60)
        results: dict = {}

        def call():
            try:
                results["response"] = httpx.post(f"{process.http_url}/v1/chat/completions", json=CHAT, timeout=20)
            except httpx.HTTPError as exc:
                results["error"] = exc

        thread = threading.Thread(target=call)
        requests_before = len(fault.requests)
        thread.start()
        deadline = time.monotonic() + 10
        while len(fault.requests) == requests_before:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        code = process.terminate()
        thread.join(20)
        assert "error" not in results, results.get("error")
        assert results["response"].status_code == 200
        assert results["response"].json()["choices"][0]["message"]["content"] == "late but fine"
        assert code == 0, process.log()
    finally:
        process.terminate()
        fault.hang_seconds = 30
