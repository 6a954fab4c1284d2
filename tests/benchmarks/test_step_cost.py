"""benchmarks/step_cost.py: its policies build as guard builds them, and its aggregation pairs rounds."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from benchmarks import instant_upstream
from benchmarks.step_cost import BASELINE, aggregate, headlines, policy_specs, write_policies
from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipelines
from guard.policy.loader import load_policy_dir
from guard.safety.embedder import Embedders
from guard.upstream.launcher import free_port


def test_every_generated_policy_loads_and_builds(tmp_path):
    steps = write_policies(tmp_path, reward_model=str(tmp_path / "reward"), tokens=16)
    embedders = Embedders()
    try:
        result = load_policy_dir(tmp_path, build=Pipelines(StepDeps(upstream=None, embedders=embedders)).build)  # type: ignore[arg-type]
    finally:
        embedders.close()
    assert not result.errors
    assert set(result.policies) == set(steps) and next(iter(steps)) == BASELINE
    policies = {name: loaded.policy for name, loaded in result.policies.items()}
    assert policies[BASELINE].steps == []
    assert {step.type for step in policies["pattern-filter"].steps} == {"input_filter", "output_filter"}
    assert all(not step.classifiers for step in policies["pattern-filter"].steps)
    for n in (2, 4, 8):
        [step] = policies[f"best-of-n-{n}"].steps
        assert step.n == n and step.speculative_rejection is None
    [step] = policies["speculative-rejection"].steps
    # Chunks shorter than the answer, or nothing is ever pruned.
    assert step.speculative_rejection.chunk_tokens < 16


def test_pattern_filter_keeps_the_shipped_rules():
    [(_, _, steps)] = [spec for spec in policy_specs("unused", 16) if spec[0] == "pattern-filter"]
    rules = [rule["name"] for step in steps for rule in step["rules"]]
    assert {"self-harm-methods", "explosives-weapons", "malware", "secrets"} <= set(rules)


def _sample(round_: int, policy: str, p50: float, cpu: float) -> dict:
    return {"round": round_, "policy": policy, "p50_ms": p50, "p99_ms": p50, "cpu_ms_per_request": cpu}


def test_added_latency_pairs_each_round_with_its_baseline_and_cpu_is_pooled():
    samples = [
        _sample(0, BASELINE, 1.0, 1.0), _sample(0, "x", 2.0, 2.0),
        _sample(1, BASELINE, 3.0, 1.0), _sample(1, "x", 4.5, 0.0),  # a CPU read quantised to 0
        _sample(2, BASELINE, 10.0, 2.0), _sample(2, "x", 10.5, 4.0),
    ]
    latencies = {BASELINE: [0.001, 0.002, 0.003], "x": [0.002, 0.004, 0.006]}
    base, row = aggregate(samples, latencies, {BASELINE: "none", "x": "a step"})
    # Per-round differences 1, 1.5, 0.5: the median is 1.0 (medians' difference would be 1.5).
    assert row["added_p50_ms"] == pytest.approx(1.0)
    assert row["cpu_ms_per_request"] == pytest.approx(2.0)
    assert row["added_cpu_ms"] == pytest.approx(2.0 - 4 / 3)
    assert row["ratio_to_passthrough"] == pytest.approx(1.5)
    assert (row["p50_ms"], row["p99_ms"], row["requests"], row["rounds"]) == (pytest.approx(4.0), pytest.approx(6.0), 3, 3)
    assert base["added_p50_ms"] == 0 and base["added_cpu_ms"] == 0 and base["ratio_to_passthrough"] == 1


def test_a_round_without_baseline_is_an_error_and_zero_baseline_cpu_has_no_ratio():
    latencies = {BASELINE: [0.001], "x": [0.001]}
    with pytest.raises(ValueError, match="rounds \\[1\\]"):
        aggregate([_sample(0, BASELINE, 1, 1), _sample(1, "x", 1, 1)], latencies, {BASELINE: "", "x": ""})
    [_, row] = aggregate([_sample(0, BASELINE, 1, 0), _sample(0, "x", 1, 1)], latencies, {BASELINE: "", "x": ""})
    assert row["ratio_to_passthrough"] is None


def test_headlines():
    def row(policy, cpu, p50=0.0):
        return {"policy": policy, "cpu_ms_per_request": cpu + 1, "added_cpu_ms": cpu, "added_p50_ms": p50}

    rows = [row(BASELINE, 0), row("best-of-n-2", 1, 10), row("best-of-n-4", 2), row("best-of-n-8", 4, 12), row("speculative-rejection", 3, 40)]
    values = {h["name"]: h["value"] for h in headlines(rows)}
    assert values["guard CPU per request, passthrough policy"] == 1
    assert values["costliest step in CPU: best-of-n-8"] == 4
    assert values["best_of_n CPU per extra candidate (tiny reward, slope over n)"] == pytest.approx(0.5)
    assert values["speculative rejection latency over plain best_of_n n=8"] == pytest.approx(28)
    assert values["best_of_n n=4 added latency not spent on guard's CPU (the reranker's batching wait)"] == -2
    assert len(headlines(rows[:2])) == 2  # no slope from one point, no comparison without its rows


async def test_instant_upstream_honours_a_smaller_max_tokens():
    port = free_port()
    server = asyncio.create_task(instant_upstream.serve(port, tokens=16))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)

            async def words(body: dict) -> list[int]:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                    payload = json.loads(await response.read())
                return [len(choice["message"]["content"].split()) for choice in payload["choices"]]

            assert await words({"n": 2, "max_tokens": 4}) == [4, 4]
            assert await words({"n": 1, "max_tokens": 64}) == [16]  # never more than --tokens
            assert await words({"n": 1}) == [16]
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
