"""What each policy step costs over passthrough, through a real `guard serve` and an instant upstream.

    python -m benchmarks.step_cost            # every step, interleaved rounds (~5 min on 2 cores)
    python -m benchmarks.step_cost --smoke    # ~30 s, every step: no model takes seconds to load

One `guard serve` (OMP_NUM_THREADS=1, torch on one thread) in front of benchmarks.instant_upstream
serves one policy per step: passthrough (the baseline), system_prompt, chain_of_thought, pattern
filters on input and output, a semantic filter and the shipped classifier filter (both MiniLM),
best_of_n with n = 2, 4, 8 (the tiny test reward model: the step's own cost, not a big model's)
and n = 4 with the shipped MiniLM embedding reward, and speculative rejection.

Each round sends `--requests` gRPC unary calls to every policy in turn (shuffled order, concurrency
1, after proxy_cost.measure's warm-up) and reads guard's CPU time around them, so

    cpu_ms_per_request = Δ guard CPU seconds (all threads) / requests

does not depend on what else the machine runs. Each policy's added cost is its difference to the
passthrough policy measured in the same round; the row reports the median over rounds. Latency
percentiles pool every round's calls. Writes benchmarks/results/step_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, stop_processes  # noqa: E402
from benchmarks.proxy_cost import _request, measure, start_guard, start_upstream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "passthrough"
SPECULATIVE_N = 8
IDLE_SECONDS = 3.0

SEMANTIC_RULE = {
    "name": "account-takeover",
    "harmful": [
        "break into someone else's social media account",
        "read another person's email without them knowing",
        "take over my ex's Instagram",
    ],
    "benign": [
        "reset my own password",
        "recover my own account after forgetting the password",
        "enable two-factor authentication on my account",
    ],
    "threshold": 0.45,
    "margin": 0.05,
}


def _shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "policies" / f"{name}.yaml").read_text())


def _pattern_filters() -> list[dict]:
    """safe-assistant's filters with only their pattern rules: what shipping regexes cost."""
    steps = []
    for step in _shipped("safe-assistant")["steps"]:
        if step["type"] in ("input_filter", "output_filter") and step.get("rules"):
            steps.append({key: value for key, value in step.items() if key not in ("semantic", "classifiers", "guard_models")})
    return steps


def policy_specs(reward_model: str, tokens: int) -> list[tuple[str, str, list[dict]]]:
    """(policy name, what its step does, its steps), baseline first."""
    system_prompt = next(s for s in _shipped("safe-assistant")["steps"] if s["type"] == "system_prompt")
    tiny = {"type": "sequence_classifier", "path": reward_model}

    def best_of_n(n: int, reward: dict, **extra) -> list[dict]:
        return [{"type": "best_of_n", "n": n, "temperature": 0.9, "reward": reward, **extra}]

    # Chunks of a quarter of the answer: three pruning rounds, 8 -> 4 -> 2 -> 1 candidates.
    rejection = {"chunk_tokens": max(1, tokens // 4), "keep_fraction": 0.5}
    return [
        (BASELINE, "no steps", []),
        ("system-prompt", "system_prompt: safe-assistant's prompt, prepended", [system_prompt]),
        ("chain-of-thought", "chain_of_thought: instruction appended, answer after the marker", _shipped("cot")["steps"]),
        ("pattern-filter", "input_filter + output_filter: safe-assistant's keyword/regex rules", _pattern_filters()),
        ("semantic-filter", "input_filter: one semantic rule (MiniLM, 3 harmful + 3 benign exemplars)",
         [{"type": "input_filter", "semantic": [SEMANTIC_RULE]}]),
        ("classifier-filter", "input_filter: the shipped classifier (prompt-harm-minilm)",
         [{"type": "input_filter", "classifiers": [{"name": "harmful-intent"}]}]),
        ("best-of-n-2", "best_of_n n=2, tiny reward model (sequence_classifier)", best_of_n(2, tiny)),
        ("best-of-n-4", "best_of_n n=4, tiny reward model (sequence_classifier)", best_of_n(4, tiny)),
        ("best-of-n-8", "best_of_n n=8, tiny reward model (sequence_classifier)", best_of_n(8, tiny)),
        ("best-of-n-4-embedding", "best_of_n n=4, MiniLM embedding reward (as policies/best-of-n.yaml)",
         best_of_n(4, {"type": "embedding"})),
        ("speculative-rejection", f"best_of_n n={SPECULATIVE_N} + speculative_rejection (chunk {rejection['chunk_tokens']} tokens, keep 1/2), tiny reward",
         best_of_n(SPECULATIVE_N, tiny, speculative_rejection=rejection)),
    ]


def write_policies(directory: Path, reward_model: str, tokens: int) -> dict[str, str]:
    """One policy file per step in `directory`; returns {policy name: step description}."""
    directory.mkdir(parents=True, exist_ok=True)
    described = {}
    for name, description, steps in policy_specs(reward_model, tokens):
        policy = {"name": name, "description": description, "steps": steps}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(policy, sort_keys=False, allow_unicode=True))
        described[name] = description
    return described


# -- aggregation (pure) -------------------------------------------------------------------------


def aggregate(samples: Sequence[dict], latencies: dict[str, Sequence[float]], steps: dict[str, str]) -> list[dict]:
    """One row per policy, in `steps` order.

    `samples`: one per (round, policy) with p50_ms and cpu_ms_per_request, equal requests each.
    Added latency compares with the baseline of the same round (the machine's load drifts between
    rounds), median over rounds. CPU is pooled over rounds, a mean: psutil reads CPU time in 10 ms
    ticks, so one round of cheap calls is quantised and a median would keep that error.
    `latencies`: every timed call's seconds, by policy.
    """
    base = {s["round"]: s for s in samples if s["policy"] == BASELINE}
    rows = []
    for policy, step in steps.items():
        mine = [s for s in samples if s["policy"] == policy]
        if not mine:
            continue
        missing = sorted({s["round"] for s in mine} - set(base))
        if missing:
            raise ValueError(f"rounds {missing} have no {BASELINE} sample to compare {policy} with")
        pairs = [(s, base[s["round"]]) for s in mine]
        cpu = statistics.fmean(s["cpu_ms_per_request"] for s in mine)
        base_cpu = statistics.fmean(b["cpu_ms_per_request"] for _, b in pairs)
        rows.append({
            "policy": policy,
            "step": step,
            "p50_ms": statistics.median(latencies[policy]) * 1e3,
            "p99_ms": percentile(list(latencies[policy]), 0.99) * 1e3,
            "cpu_ms_per_request": cpu,
            "added_p50_ms": statistics.median(s["p50_ms"] - b["p50_ms"] for s, b in pairs),
            "added_cpu_ms": cpu - base_cpu,
            "ratio_to_passthrough": cpu / base_cpu if base_cpu else None,
            "p50_ratio_to_passthrough": statistics.median(s["p50_ms"] / b["p50_ms"] for s, b in pairs),
            "rounds": len(mine),
            "requests": len(latencies[policy]),
        })
    return rows


def _slope(points: Sequence[tuple[float, float]]) -> float:
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def headlines(rows: Sequence[dict]) -> list[dict]:
    """A few numbers worth quoting; those whose rows are missing are left out."""
    by = {row["policy"]: row for row in rows}
    out = []
    if BASELINE in by:
        out.append({"name": "guard CPU per request, passthrough policy", "value": by[BASELINE]["cpu_ms_per_request"], "unit": "ms"})
    steps = [row for row in rows if row["policy"] != BASELINE]
    if steps:
        costliest = max(steps, key=lambda row: row["added_cpu_ms"])
        out.append({"name": f"costliest step in CPU: {costliest['policy']}", "value": costliest["added_cpu_ms"], "unit": "ms CPU added per request"})
    best = [(n, by[f"best-of-n-{n}"]["added_cpu_ms"]) for n in (2, 4, 8) if f"best-of-n-{n}" in by]
    if len(best) >= 2:
        out.append({"name": "best_of_n CPU per extra candidate (tiny reward, slope over n)", "value": _slope(best), "unit": "ms CPU per candidate"})
    if "best-of-n-4" in by:
        out.append({
            "name": "best_of_n n=4 added latency not spent on guard's CPU (the reranker's batching wait)",
            "value": by["best-of-n-4"]["added_p50_ms"] - by["best-of-n-4"]["added_cpu_ms"],
            "unit": "ms",
        })
    if "speculative-rejection" in by and f"best-of-n-{SPECULATIVE_N}" in by:
        out.append({
            "name": f"speculative rejection latency over plain best_of_n n={SPECULATIVE_N}",
            "value": by["speculative-rejection"]["added_p50_ms"] - by[f"best-of-n-{SPECULATIVE_N}"]["added_p50_ms"],
            "unit": "ms added p50 (instant upstream: no generation saved)",
        })
    return out


def _ratio(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else f"{'-':>6}"


def table(rows: Sequence[dict]) -> str:
    lines = [f"{'policy':24} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10} {'+p50 ms':>8} {'+CPU ms':>8} {'CPU ×':>6}"]
    for row in rows:
        lines.append(
            f"{row['policy']:24} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['cpu_ms_per_request']:10.2f} "
            f"{row['added_p50_ms']:8.2f} {row['added_cpu_ms']:8.2f} {_ratio(row['ratio_to_passthrough'])}"
        )
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------


async def _check(stub, name: str, tokens: int) -> list[str]:
    """One traced call: the policy answers, unrefused; returns the step types its trace shows."""
    request = _request(tokens)
    request.policy, request.include_trace = name, True
    reply = await stub.Generate(request, timeout=120)
    if reply.refusal.refused or not reply.text or reply.policy != name:
        raise SystemExit(f"policy {name}: unexpected answer {reply}")
    return sorted({step.type for step in reply.trace.steps})


async def run(args) -> dict:
    from guard.v1 import guard_pb2_grpc
    from tests.support.tiny_models import build_tiny_reward_model

    # Inherited by guard: torch on two threads stalls for seconds on these 2-core machines.
    os.environ["OMP_NUM_THREADS"] = "1"
    workdir = Path(tempfile.mkdtemp(prefix="guard-step-cost-"))
    steps = write_policies(workdir / "policies", str(build_tiny_reward_model()), args.tokens)
    load_average = os.getloadavg()
    upstream_process, upstream = start_upstream(args.tokens)
    processes = [upstream_process]
    samples: list[dict] = []
    latencies: dict[str, list[float]] = {name: [] for name in steps}
    traced: dict[str, list[str]] = {}
    try:
        started = time.monotonic()
        # MiniLM (semantic and classifier filters) loads before guard serves.
        guard_process, grpc_port, _ = start_guard(upstream, workdir, extra=["--policies", str(workdir / "policies")])
        processes.append(guard_process)
        startup_s = time.monotonic() - started
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = guard_pb2_grpc.GuardStub(channel)
        first_call_s = {}
        for name in steps:  # reward models load on their first request
            started = time.monotonic()
            traced[name] = await _check(stub, name, args.tokens)
            first_call_s[name] = time.monotonic() - started

        def caller(name: str):
            request = _request(args.tokens)
            request.policy = name
            timed: list[float] = []

            async def call() -> None:
                started = time.perf_counter()
                await stub.Generate(request, timeout=30)
                timed.append(time.perf_counter() - started)

            return call, timed

        # Guard's background threads (policy and health polling) bill the slow policies a little more.
        before = psutil.Process(guard_process.pid).cpu_times()
        await asyncio.sleep(IDLE_SECONDS)
        after = psutil.Process(guard_process.pid).cpu_times()
        idle_cpu_ms_per_s = ((after.user - before.user) + (after.system - before.system)) / IDLE_SECONDS * 1e3

        rng = random.Random(args.seed)
        began = time.monotonic()
        print(f"guard up in {startup_s:.1f} s; first calls (s): {first_call_s}", flush=True)
        for round_ in range(args.rounds):
            order = list(steps)
            rng.shuffle(order)
            for name in order:
                call, timed = caller(name)
                result = await measure(guard_process.pid, call, args.requests, 1)
                latencies[name] += timed[-args.requests :]  # the rest were measure's warm-up
                samples.append({"round": round_, "policy": name, **{k: result[k] for k in ("p50_ms", "p99_ms", "cpu_ms_per_request")}})
            print(f"round {round_ + 1}/{args.rounds} done at {time.monotonic() - began:.0f} s", flush=True)
        await channel.close()
    finally:
        stop_processes(processes)
    rows = aggregate(samples, latencies, steps)
    import torch

    return {
        "benchmark": "step_cost",
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "guard_env": {"OMP_NUM_THREADS": "1"}, "load_average_at_start": load_average,
        },
        "upstream": f"benchmarks.instant_upstream ({args.tokens}-token canned answer, shorter when max_tokens asks)",
        "baseline": "passthrough policy through the same guard",
        "method": {
            "door": "gRPC unary", "concurrency": 1, "rounds": args.rounds, "requests_per_round": args.requests,
            "order": "shuffled per round", "smoke": args.smoke,
            "cpu_ms_per_request": "guard process CPU (user+system, all threads) / requests, pooled over rounds",
            "added_cpu_ms / ratio_to_passthrough": "CPU minus / over passthrough's, over the same rounds",
            "added_p50_ms / p50_ratio_to_passthrough": "p50 minus / over passthrough's p50 in the same round; median over rounds",
            "p50_ms / p99_ms": "pooled over every round's timed calls",
        },
        "skipped": [],
        "guard_startup_s": startup_s,
        "guard_idle_cpu_ms_per_s": idle_cpu_ms_per_s,
        "first_call_s": first_call_s,
        "trace_step_types": traced,
        "rows": rows,
        "headlines": headlines(rows),
        "samples": samples,
    }


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50, help="timed calls per policy per round")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each canned answer")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the order within rounds")
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 20 calls: seconds, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.requests = 2, 20
    result = asyncio.run(run(args))
    print(table(result["rows"]))
    for headline in result["headlines"]:
        print(f"{headline['name']}: {headline['value']:.2f} {headline['unit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_rounded(result), indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
