"""A 30 s soak (benchmarks/soak.py) against the session's vLLM, through the fault proxy.

Mixed doors, kinds and policies at concurrency 64 with delays, drops and corrupted bodies injected between
guard and vLLM: every outcome must be one guard documents (OK, a refusal, UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED; the HTTP equivalents), nothing may hang, and guard must end with nothing in flight.
The full 10-minute soak, with guard's memory checked, is `python benchmarks/soak.py`.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.fault_proxy import Faults, ProxyThread
from benchmarks.soak import GuardServer, Settings, run_soak, write_policies

pytestmark = [pytest.mark.integration, pytest.mark.soak]

# More faults than the full soak, so each kind shows up within 30 s; delays of 2-7 s against a 4 s deadline.
FAULTS = Faults(delay=0.06, drop=0.04, drop_mid=0.06, corrupt=0.06, delay_seconds=(2.0, 7.0), seed=1)
SETTINGS = Settings(duration=30.0, warmup=0.0, concurrency=64, deadline=4.0, slack=5.0, window=10.0, seed=1, max_tokens=(4, 24))


@pytest.mark.timeout(120)
def test_a_short_soak_has_only_expected_outcomes(vllm_server, tmp_path):
    write_policies(tmp_path / "policies")
    with ProxyThread(vllm_server.url, FAULTS) as proxy:
        guard = GuardServer(proxy.url, vllm_server.model, tmp_path / "policies", tmp_path / "guard.log", max_in_flight=48)
        try:
            guard.wait_serving()
            report = asyncio.run(run_soak(guard, SETTINGS, proxy, log=lambda *_: None))
        finally:
            guard.stop()
    summary = {key: report[key] for key in ("statuses", "by_door_kind", "unexpected", "drain", "guard_outcomes", "faults_injected")}
    described = json.dumps(summary, indent=1)
    assert report["unexpected"]["count"] == 0, described
    assert report["drain"]["in_flight_left"] == 0, described
    # Every outcome that is injected often enough occurred: answers, refusals (a third of safe-assistant's
    # prompts are harmful), faults that reach the client, delays past the deadline.
    assert {"OK", "REFUSED", "UNAVAILABLE", "DEADLINE_EXCEEDED"} <= set(report["statuses"]), described
    assert all(report["faults_injected"][kind] for kind in ("delay", "drop", "drop_mid", "corrupt")), described
    assert report["requests"] >= 200, described
