"""`guard serve --workers 2` as a real subprocess in front of a fault-injection upstream: connections
spread over both workers, /metrics merges them exactly, policies reload in each, a killed worker is
replaced, SIGTERM drains them all, and a supervisor whose workers cannot start exits 1."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guard.settings import Settings
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.fault_upstream import FaultUpstream
from tests.support.guard_process import GuardProcess
from tests.support.net import free_port

# guard.service logs one line per request (at DEBUG); a worker's log lines carry its index and pid.
HANDLED = re.compile(r"\[worker (\d+) pid (\d+)\] guard\.service: (\S+) tenant=\S+ policy=(\S+)")


def wait_log(guard: GuardProcess, pattern: str, *, after: int = 0, count: int = 1, timeout: float = 120.0) -> list[re.Match]:
    """The first `count` matches of `pattern` in guard's log past character `after`, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        matches = list(re.finditer(pattern, guard.log()[after:]))
        if len(matches) >= count:
            return matches[:count]
        if time.monotonic() > deadline or guard.process.poll() is not None:
            raise AssertionError(f"no {count} x {pattern!r} in guard's log:\n{guard.log()[-4000:]}")
        time.sleep(0.1)


def worker_pids(guard: GuardProcess) -> dict[str, str]:
    """Worker index -> pid of its latest process."""
    return dict(re.findall(r"worker (\d+) started \(pid (\d+)\)", guard.log()))


def handled_by(guard: GuardProcess, after: int, requests: int) -> list[tuple[str, str]]:
    """(pid, policy) of each of the `requests` requests logged past `after`."""
    return [(m[2], m[4]) for m in wait_log(guard, HANDLED.pattern, after=after, count=requests, timeout=30)]


def metric(guard: GuardProcess, name: str, **labels: str) -> dict[str, float]:
    """{sample name: value summed over samples matching `labels`} for samples named `name`*."""
    text = httpx.get(guard.metrics_url, timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(name) and labels.items() <= sample.labels.items():
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def requests_total(guard: GuardProcess) -> float:
    return metric(guard, "guard_requests_total").get("guard_requests_total", 0.0)


def generate_on_fresh_channels(guard: GuardProcess, requests: int, policy: str = "") -> None:
    """One new connection per request, which the kernel gives to either worker. A local subchannel pool:
    channels open at once in one process otherwise share one connection, so one worker."""
    for _ in range(requests):
        with grpc.insecure_channel(guard.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answer = guard_pb2_grpc.GuardStub(channel).Generate(pb.GenerateRequest(prompt="hi", policy=policy), timeout=10)
            assert answer.text == "late but fine" and answer.policy == (policy or "default")


def start_workers(tmp_path: Path, upstream: str, *, model: str | None = None, http_port: int | None = None) -> GuardProcess:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("name: default\n")
    extra = ["--workers", "2", "--log-level", "DEBUG"]  # the last of a repeated flag wins
    extra += ["--http-port", str(http_port)] if http_port is not None else []
    return GuardProcess(policies, [upstream], model=model, log_path=tmp_path / "guard.log", extra=extra)


@pytest.fixture(scope="module")
def upstream():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as fault:
        yield fault


@pytest.fixture(scope="module")
def guard(upstream, tmp_path_factory):
    process = start_workers(tmp_path_factory.mktemp("workers"), upstream.url, model="fault-model")
    try:
        wait_log(process, r"guard serving with 2 workers")
        yield process
    finally:
        assert process.terminate() == 0, process.log()[-4000:]


def test_settings_reach_workers_unchanged_through_the_environment():
    settings = Settings(
        host="0.0.0.0", port=1, tls_cert=Path("c.pem"), tls_key=Path("k.pem"), api_keys=None, allow_policies=["a", "b"],
        upstream=["http://u1", "http://u2"], grace_seconds=2.5, poll_seconds=0.1, reuse_port=True, workers=3,
    )
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env(Settings().to_env()) == Settings()


def test_fresh_connections_reach_both_workers_and_metrics_count_every_request_once(guard):
    pids = worker_pids(guard)
    before, log_from = requests_total(guard), len(guard.log())
    generate_on_fresh_channels(guard, 30)
    for _ in range(10):  # each a new HTTP connection
        response = httpx.post(f"{guard.http_url}/v1/completions", json={"model": "guard/default", "prompt": "hi"}, timeout=10)
        assert response.status_code == 200
    assert requests_total(guard) - before == 40
    assert {pid for pid, _ in handled_by(guard, log_from, 40)} == set(pids.values())
    assert metric(guard, "guard_requests_in_flight") == {"guard_requests_in_flight": 0.0}
    # The workers' process metrics come from the supervisor, one series per process.
    cpu = {f"worker{index}" for index in pids} | {"supervisor"}
    assert all(metric(guard, "process_cpu_seconds_total", process=name) for name in cpu)


def test_a_policy_file_reloads_in_every_worker(guard):
    log_from = len(guard.log())
    (Path(guard.log_path).parent / "policies" / "brief.yaml").write_text(
        "name: brief\nsteps: [{type: system_prompt, content: Be brief.}]\n"
    )
    loaded = wait_log(guard, r"pid (\d+)\] guard\.policy\.store: policy brief loaded", after=log_from, count=2, timeout=30)
    assert {m[1] for m in loaded} == set(worker_pids(guard).values())
    log_from = len(guard.log())
    generate_on_fresh_channels(guard, 20, policy="brief")
    assert {pid for pid, policy in handled_by(guard, log_from, 20) if policy == "brief"} == set(worker_pids(guard).values())
    assert metric(guard, "guard_policies_loaded") == {"guard_policies_loaded": 2.0}


def test_a_killed_worker_is_restarted_and_serving_resumes(guard):
    before, log_from = requests_total(guard), len(guard.log())
    killed = worker_pids(guard)["1"]
    os.kill(int(killed), signal.SIGKILL)
    wait_log(guard, rf"worker 1 \(pid {killed}\) exited with -9 after \d+s; restarting it in 1s", after=log_from, timeout=30)
    generate_on_fresh_channels(guard, 10)  # worker 0 alone meanwhile
    wait_log(guard, r"worker 1 \(pid \d+\) serving again", after=log_from)
    pids = worker_pids(guard)
    assert pids["1"] != killed
    log_from = len(guard.log())
    generate_on_fresh_channels(guard, 30)
    assert {pid for pid, _ in handled_by(guard, log_from, 30)} == set(pids.values())
    # The dead worker's counts stay in the sum.
    assert requests_total(guard) - before == 40


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(tmp_path):
    with FaultUpstream("slow_ok", hang_seconds=4.0) as slow:  # within the 5 s grace
        guard = start_workers(tmp_path, slow.url, model="fault-model")
        try:
            serving = wait_log(guard, r"guard serving with 2 workers \(metrics merged from (\S+)\)")[0]
            metrics_dir = Path(serving[1])
            assert metrics_dir.is_dir()
            log_from = len(guard.log())
            outcomes: list[str] = []

            def call() -> None:
                try:
                    generate_on_fresh_channels(guard, 1)
                    outcomes.append("ok")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)

            callers = [threading.Thread(target=call) for _ in range(16)]
            for caller in callers:
                caller.start()
            deadline = time.monotonic() + 30
            while metric(guard, "guard_requests_in_flight").get("guard_requests_in_flight") != 16:  # livesum
                assert time.monotonic() < deadline, "16 requests never in flight at once"
                time.sleep(0.05)
            guard.process.send_signal(signal.SIGTERM)
            for caller in callers:
                caller.join(30)
            assert guard.process.wait(30) == 0, guard.log()[-4000:]
        finally:
            guard.terminate()
    assert outcomes == ["ok"] * 16
    assert {pid for pid, _ in handled_by(guard, log_from, 16)} == set(worker_pids(guard).values())
    assert len(re.findall(r"\] guard\.app: shutting down: draining", guard.log())) == 2
    assert not metrics_dir.exists()
    assert "Traceback" not in guard.log()


def test_a_taken_port_stops_the_supervisor_before_any_worker_starts(tmp_path, upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        guard = start_workers(tmp_path, upstream.url, model="fault-model", http_port=port)
        code = guard.process.wait(60)
        guard.terminate()
    assert code == 1, guard.log()
    assert f"cannot start: cannot bind HTTP port 127.0.0.1:{port}" in guard.log()
    assert "worker 0 started" not in guard.log() and "Traceback" not in guard.log()


def test_workers_that_cannot_start_make_the_supervisor_exit_1(tmp_path):
    nothing = f"http://127.0.0.1:{free_port()}"  # no --model: each worker asks this closed port for one, and fails
    guard = start_workers(tmp_path, nothing)
    code = guard.process.wait(120)
    guard.terminate()
    assert code == 1, guard.log()
    assert re.search(r"cannot start: worker \d exited with 1 before serving", guard.log()), guard.log()
    assert "guard serving with" not in guard.log()
