"""ManagedVLLM: process-group handling against a stand-in server (fast), then real vLLM."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from guard.upstream.launcher import ManagedVLLM, VLLMStartError

# A stand-in for vLLM: forks a grandchild (like vLLM's engine core), then serves
# GET /health. argv: port, mode ("ok" | "ignore-term" | "crash" | "never-ready").
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, signal, subprocess, sys, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "crash":
        for i in range(100):
            print(f"log line {i}", flush=True)
        sys.exit(3)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "never-ready":
        time.sleep(300)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


class FakeVLLM(ManagedVLLM):
    def __init__(self, tmp_path: Path, mode: str, **kwargs: object) -> None:
        super().__init__(tmp_path, log_path=tmp_path / "server.log", **kwargs)  # type: ignore[arg-type]
        self.mode = mode

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(self.port), self.mode]


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (orphans may wait a while to be reaped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def wait_until_gone(pgid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def test_command_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    server = ManagedVLLM(
        tmp_path, port=8123, served_model_name="m", dtype="bfloat16", extra_args=["--seed", "7"], env={"FOO": "bar"}
    )
    assert server.url == "http://127.0.0.1:8123"
    assert server.served_model_name == "m"
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in (f"--model {tmp_path}", "--port 8123", "--max-model-len 512", "--dtype bfloat16", "--served-model-name m"):
        assert part in joined
    assert cmd[-2:] == ["--seed", "7"]
    env = server.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["FOO"] == "bar"
    assert env["VLLM_CACHE_ROOT"].endswith(os.path.join("guard", "vllm"))


def test_picks_free_port_and_defaults_name_to_model_dir(tmp_path: Path) -> None:
    a, b = ManagedVLLM(tmp_path), ManagedVLLM(tmp_path)
    assert 0 < a.port < 65536 and a.url == f"http://127.0.0.1:{a.port}"
    assert a.served_model_name == str(tmp_path)
    assert "--served-model-name" not in a.command() and b.port > 0


def test_start_then_stop_kills_whole_group_and_is_idempotent(tmp_path: Path) -> None:
    server = FakeVLLM(tmp_path, "ok")
    with server:
        assert server.running()
        pgid = server.pid
        assert pgid is not None
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
            assert resp.status == 200
        assert len(live_group_members(pgid)) == 2  # server + its grandchild
    assert not server.running() and server.pid is None
    assert wait_until_gone(pgid) == []
    server.stop()  # second stop is a no-op
    server.stop()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    server = FakeVLLM(tmp_path, "ignore-term").start()
    pgid = server.pid
    assert pgid is not None
    t0 = time.monotonic()
    server.stop(grace=1.0)
    assert 0.9 < time.monotonic() - t0 < 10
    assert wait_until_gone(pgid) == []


def test_early_exit_raises_with_log_tail(tmp_path: Path) -> None:
    server = FakeVLLM(tmp_path, "crash")
    with pytest.raises(VLLMStartError) as err:
        server.start()
    msg = str(err.value)
    assert "exited with code 3" in msg
    assert "log line 99" in msg and "log line 60" in msg
    assert "log line 59\n" not in msg  # only the last 40 lines
    assert not server.running()


def test_startup_timeout_raises_and_cleans_up(tmp_path: Path) -> None:
    server = FakeVLLM(tmp_path, "never-ready", startup_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(VLLMStartError, match="did not become healthy within 2 s"):
        server.start()
    assert time.monotonic() - t0 < 20
    assert not server.running()


def test_session_server_lists_served_model(vllm_server) -> None:
    assert get_json(f"{vllm_server.url}/v1/models")["data"][0]["id"] == vllm_server.model == "tiny-llama"
    body = json.dumps({"model": vllm_server.model, "prompt": "Hello", "max_tokens": 4, "n": 2}).encode()
    req = urllib.request.Request(
        f"{vllm_server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert len(json.load(resp)["choices"]) == 2


@pytest.mark.integration
def test_bad_model_dir_fails_fast_with_log(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    server = ManagedVLLM(bad, log_path=tmp_path / "vllm.log", startup_timeout=300)
    t0 = time.monotonic()
    with pytest.raises(VLLMStartError) as err:
        server.start()
    elapsed = time.monotonic() - t0
    assert elapsed < 120, f"took {elapsed:.0f} s to notice the failure"
    msg = str(err.value)
    assert "exited with code" in msg and "vllm.log" in msg
    assert len(msg.splitlines()) > 5  # carries the log tail, not just a status line
    assert not server.running()


@pytest.mark.integration
def test_real_server_stop_leaves_no_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Its own server (~40 s): vLLM's engine core is a grandchild and must die with it."""
    server = ManagedVLLM(tiny_llama_dir, served_model_name="own", log_path=tmp_path / "vllm.log")
    with server:
        pgid = server.pid
        assert pgid is not None
        assert get_json(f"{server.url}/v1/models")["data"][0]["id"] == "own"
        assert len(live_group_members(pgid)) >= 2  # API server + engine core (+ worker)
    assert wait_until_gone(pgid, timeout=10) == []
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/health", timeout=2)
